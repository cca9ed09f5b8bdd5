-- Skewed load for wrk: every 10th request of each wrk thread is GET /slow,
-- which burns a few ms of CPU in the backend. The -H headers still apply.
local n = 0
request = function()
  n = n + 1
  if n % 10 == 0 then
    return wrk.format("GET", "/slow")
  end
  return wrk.format("GET", "/")
end
