-- POST /set/put of a random key (new or existing) whose value differs from the one it holds
-- (its "age" drawn anew): every put of an existing key rewrites it, with its index record kept
local keys = tonumber(os.getenv("KEYS") or "100000")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local i = math.random(0, keys * 2 - 1)
  return wrk.format(nil, "/set/put", nil,
    '{"database":"bench","set":"users","key":"user' .. i ..
    '","value":{"name":"John","email":"user' .. i .. '@example.com","age":' .. math.random(0, 1000000) .. '}}')
end
