-- wrk script: bench/post.lua with a body the API refuses before the broker
-- (400: "seconds" is not a number), so that a run measures the web process
-- alone: its guards, not RabbitMQ.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post.lua")

wrk.body = '{"seconds": "x"}'
