-- POST /set/get of a random preloaded key (keys user0 .. user<KEYS-1>)
local keys = tonumber(os.getenv("KEYS") or "100000")
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local i = math.random(0, keys - 1)
  return wrk.format(nil, "/set/get",
    nil, '{"database":"bench","set":"users","key":"user' .. i .. '"}')
end
