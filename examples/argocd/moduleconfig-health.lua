-- Argo CD health check for deckhouse.io/ModuleConfig, built on the status conditions bpflb's operator
-- writes (operator/bpflb/control/status.py): Ready, Progressing and Degraded, each with a reason.
--   Degraded=True                       -> Degraded    (InvalidConfiguration, AgentError, ModeNotSupported)
--   status older than the spec          -> Progressing (the operator has not seen this generation yet)
--   Progressing=True                    -> Progressing (RollingOut, Reconciling, Uninstalling)
--   Ready=True, or Ready=False Disabled -> Healthy     (every node runs it, or the datapath is removed as asked)
--   anything else                       -> Progressing
-- ModuleConfigs of other modules carry no such conditions (Deckhouse writes only status.message): they
-- are Healthy here, so one check serves every ModuleConfig of a Deckhouse cluster.
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local ready, progressing, degraded = condition("Ready"), condition("Progressing"), condition("Degraded")

if ready == nil and progressing == nil and degraded == nil then
  if obj.metadata.name == "cni-cilium" then
    hs.status = "Progressing"
    hs.message = "Waiting for bpflb's operator to report on cni-cilium"
  else
    hs.status = "Healthy"
    hs.message = (obj.status and obj.status.message) or ""
  end
  return hs
end

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded)
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to see generation " .. generation .. " (status is of " .. observed .. ")"
  return hs
end

if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing)
  return hs
end

if ready ~= nil and (ready.status == "True" or ready.reason == "Disabled") then
  hs.status = "Healthy"
  hs.message = obj.status.message or describe(ready)
  return hs
end

hs.status = "Progressing"
hs.message = (ready and describe(ready)) or "Waiting for the Ready condition"
return hs
