-- Argo CD health check for every uwsgi.it kind (Server, Customer, Container, PortMapping,
-- CustomDistro). The operator follows the kstatus conventions: Stalled=True only when a person
-- must act, Ready summarising everything else, observedGeneration on the status and on each
-- condition. So this check reads the same as kstatus (Flux, Helm 4's --wait):
--   Stalled=True                                -> Degraded
--   Ready=True for the current generation       -> Healthy
--   anything else (not reported, older spec, Ready=False) -> Progressing
-- The operator's messages name their reason, so the messages are shown as they are.
-- Only base Lua 5.1 (no string library): Argo CD runs argocd-cm scripts without open libs.
local hs = {}
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report"
  return hs
end

if generation ~= nil and obj.status.observedGeneration ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. generation
  return hs
end

local ready = nil
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Stalled" and condition.status == "True" then
    hs.status = "Degraded"
    hs.message = condition.message
    return hs
  end
  if condition.type == "Ready" and ready == nil then
    ready = condition
  end
end

if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report Ready"
  return hs
end

if generation ~= nil and ready.observedGeneration ~= nil and ready.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Ready describes an older generation; waiting for generation " .. generation
  return hs
end

if ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message
  return hs
end

hs.status = "Progressing"
hs.message = ready.message
return hs
