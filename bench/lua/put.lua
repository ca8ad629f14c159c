-- POST /set/put of a random key (new or existing) with the issue's value shape
local keys = tonumber(os.getenv("KEYS") or "100000")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local i = math.random(0, keys * 2 - 1)
  return wrk.format(nil, "/set/put", nil,
    '{"database":"bench","set":"users","key":"user' .. i ..
    '","value":{"name":"John","email":"user' .. i .. '@example.com","age":30}}')
end
