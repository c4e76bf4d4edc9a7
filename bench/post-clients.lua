-- wrk script: bench/post.lua, with each request from a client address of its
-- own (X-Forwarded-For). With CLIENT_IP_HEADER=X-Forwarded-For onebox's
-- per-client rate limiter then sees many clients, none near its limit: what
-- the limiter costs a service with many users.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "post.lua")

local post_setup = setup
local count = 0

function setup(thread)
  post_setup(thread)
  count = count + 1
  thread:set("id", count)
end

local sent = 0

function request()
  sent = sent + 1
  wrk.headers["X-Forwarded-For"] =
    string.format("10.%d.%d.%d", id % 256, math.floor(sent / 256) % 256, sent % 256)
  return wrk.format()
end
