-- wrk script: cycle through the request paths listed, one per line, in the file $URLS.
local paths = {}
for line in io.lines(os.getenv("URLS")) do
  paths[#paths + 1] = line
end
local counter = 0
request = function()
  counter = counter % #paths + 1
  return wrk.format("GET", paths[counter])
end
