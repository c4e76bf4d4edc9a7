-- wrk script: bench/post.lua, with requests from many client addresses
-- (X-Forwarded-For). With CLIENT_IP_HEADER=X-Forwarded-For onebox's
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
-- Addresses cycle through a pool this large, shared by every thread: at the
-- bench's rates (3,000 requests a second at most) each address writes about
-- 20 times a minute, below the default limit (60), and the pool stays within
-- the clients the limiter counts per window (RATE_LIMIT_CLIENTS, 10,000).
-- nil: a new address for every request (a storm of spoofed ones).
pool = 8000

function request()
  sent = sent + 1
  local n = pool and (id * 125 + sent) % pool or id * 65536 + sent
  wrk.headers["X-Forwarded-For"] = string.format(
    "10.%d.%d.%d", math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  return wrk.format()
end
