-- wrk script: bench/refused.lua, each request from a client address of its
-- own (bench/post-clients.lua): many clients, or a storm of spoofed ones.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post-clients.lua")

wrk.body = '{"seconds": "x"}'
pool = nil
