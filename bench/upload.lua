-- wrk: POST a body of BENCH_BODY_SIZE bytes (default 1 MiB) on every request.
-- wrk.format() adds the Content-Length header.
local size = tonumber(os.getenv("BENCH_BODY_SIZE") or "") or 1048576
wrk.method = "POST"
wrk.body = string.rep("x", size)
wrk.headers["Content-Type"] = "application/octet-stream"
