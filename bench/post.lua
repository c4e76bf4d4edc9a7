-- wrk script: POST /tasks {"seconds": 1}, and end with nothing in flight.
--
-- Run it with one connection per thread (-t N -c N) and the measuring time
-- after "--". Each thread stops itself at its first response past that time,
-- so every request sent was answered and every 2xx can be matched with a
-- message in the queue. done() prints the totals as one line of JSON.

wrk.method = "POST"
wrk.body = '{"seconds": 1}'
wrk.headers["Content-Type"] = "application/json"

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock, bench_timespec *now);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec")

-- os.time() counts whole seconds; a round must end to the millisecond.
local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) / 1e9
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  started = now()
  deadline = started + tonumber(args[1])
  stopped = 0
  ok = 0
  other = 0
end

function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    other = other + 1
  end
  if now() >= deadline then
    stopped = now()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local ok_total, other_total, unfinished = 0, 0, 0
  local first, last = math.huge, 0
  for _, thread in ipairs(threads) do
    ok_total = ok_total + thread:get("ok")
    other_total = other_total + thread:get("other")
    first = math.min(first, thread:get("started"))
    local stopped_at = thread:get("stopped")
    if stopped_at == 0 then
      -- No response came after the deadline: wrk's own limit cut it off.
      unfinished = unfinished + 1
    else
      last = math.max(last, stopped_at)
    end
  end
  if last == 0 then
    last = first + summary.duration / 1e6
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH {"ok": %d, "other": %d, "seconds": %.6f, "unfinished": %d, "p50_us": %.1f, "p99_us": %.1f, '
      .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "timeouts": %d}\n',
    ok_total, other_total, last - first, unfinished, latency:percentile(50), latency:percentile(99),
    errors.connect, errors.read, errors.write, errors.timeout
  ))
end
