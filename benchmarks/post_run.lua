-- wrk: authenticated POST /runs with a fixed body; the token comes from the environment.
wrk.method = "POST"
wrk.body = '{"image":"alpine:latest","command":["sh","-c","printf OK"],"timeout_seconds":60}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")

done = function(summary, latency, requests)
  io.write(string.format("non2xx=%d errors=%d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
