-- wrk script of tests/test_rig.py: paced requests, then one JSON summary line.
-- RIG_PAUSE_MS: milliseconds each connection waits between its requests (0 = none).
local pause = tonumber(os.getenv("RIG_PAUSE_MS") or "0")

function delay()
   return pause
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'RIG {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d,'
         .. ' "status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d}\n',
      summary.requests, summary.duration, errors.connect, errors.read, errors.write,
      errors.status, errors.timeout, latency:percentile(50), latency:percentile(99),
      latency.max))
end
