-- wrk script of bench.serve_load: POST the JPEG files named after `--` in turn, as
-- Content-Type image/jpeg, count responses other than 200, and print one JSON line at the end.
local requests = {}
local next_request = 0
not_ok = 0 -- global: done() reads it from each thread with thread:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  for i, path in ipairs(args) do
    local file = assert(io.open(path, "rb"))
    local body = file:read("*a")
    file:close()
    requests[i] = wrk.format("POST", nil, { ["Content-Type"] = "image/jpeg" }, body)
  end
  assert(#requests > 0, "name at least one JPEG file after --")
end

function request()
  next_request = next_request % #requests + 1
  return requests[next_request]
end

function response(status, headers, body)
  if status ~= 200 then
    not_ok = not_ok + 1
  end
end

function done(summary, latency)
  local rejected = 0
  for _, thread in ipairs(threads) do
    rejected = rejected + thread:get("not_ok")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "not_ok": %d, "connect_errors": %d, '
      .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d, '
      .. '"max_us": %d}\n',
    summary.requests, summary.duration, rejected, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max
  ))
end
