-- POST /index/query on the email index: exactly one match per preloaded key
local keys = tonumber(os.getenv("KEYS") or "100000")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local i = math.random(0, keys - 1)
  return wrk.format(nil, "/index/query", nil,
    '{"database":"bench","set":"users","index":"email_index","value":"user' .. i .. '@example.com"}')
end
