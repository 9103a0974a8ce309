{{/* Names, labels and images shared by every object of the chart. */}}

{{- define "vvault-pep.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vvault-pep.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end -}}

{{- define "vvault-pep.labels" -}}
{{ include "vvault-pep.selectorLabels" . }}
app.kubernetes.io/part-of: vvault
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given */}}
{{- define "vvault-pep.image" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}
{{- end -}}

{{- define "vvault-pep.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* pep.yaml, built from .Values.pep; extraConfig is merged over it last. */}}
{{- define "vvault-pep.pepConfig" -}}
{{- $v := .Values.pep -}}
{{- $listener := dict "host" "0.0.0.0" "port" 8443 "drain_s" $v.drainSeconds
      "tls" (dict "cert_file" "/etc/vvault-pep/tls/tls.crt" "key_file" "/etc/vvault-pep/tls/tls.key"
                  "client_ca_file" "/etc/vvault-pep/client-ca/ca.crt" "client_auth" "required") -}}
{{- $admin := dict "host" "0.0.0.0" "port" 9901 -}}
{{- if $v.adminTokenSecret -}}
{{- $_ := set $admin "token" "${file:/etc/vvault-pep/secrets/admin/admin-token}" -}}
{{- end -}}
{{- $routes := list -}}
{{- range $v.routes -}}
{{- $routes = append $routes (merge (deepCopy .) (deepCopy $v.routeDefaults)) -}}
{{- end -}}
{{- $identity := dict "issuers" $v.issuers "workload" (dict "trust_domains" $v.workloadTrustDomains) -}}
{{- $sinks := list (dict "type" "stdout") -}}
{{- $cfg := dict
      "listener" $listener
      "admin" $admin
      "opa" (dict "url" "unix:///var/run/opa/opa.sock" "timeout_ms" 250)
      "identity" $identity
      "upstreams" (dict "app" (dict "url" (printf "http://127.0.0.1:%d" (int .Values.app.port))))
      "routes" $routes -}}
{{- if $v.redis.url -}}
{{- $redis := dict "url" $v.redis.url "timeout_ms" 50 -}}
{{- if $v.redis.username }}{{ $_ := set $redis "username" $v.redis.username }}{{ end -}}
{{- if $v.redis.passwordSecret }}{{ $_ := set $redis "password" "${file:/etc/vvault-pep/secrets/redis/redis-password}" }}{{ end -}}
{{- if $v.redis.caConfigMap }}{{ $_ := set $redis "ca_file" "/etc/vvault-pep/redis-ca/ca.crt" }}{{ end -}}
{{- $_ := set $cfg "redis" $redis -}}
{{- end -}}
{{- if $v.otlpEndpoint -}}
{{- $sinks = append $sinks (dict "type" "otlp" "protocol" "grpc" "endpoint" $v.otlpEndpoint) -}}
{{- $_ := set $cfg "telemetry" (dict "traces" (dict "exporter" "otlp-grpc" "endpoint" $v.otlpEndpoint "insecure" (hasPrefix "http://" $v.otlpEndpoint))) -}}
{{- end -}}
{{- $_ := set $cfg "audit" (dict "sinks" $sinks) -}}
{{- toYaml (mustMergeOverwrite $cfg (deepCopy $v.extraConfig)) -}}
{{- end -}}

{{/* OPA's config: a signed bundle from the bundle service, nothing logged by OPA itself. */}}
{{- define "vvault-pep.opaConfig" -}}
{{- $b := .Values.opa.bundleService -}}
{{- $service := dict "url" (required "opa.bundleService.url is required" $b.url) -}}
{{- if $b.tokenSecret -}}
{{- $_ := set $service "credentials" (dict "bearer" (dict "token_path" "/etc/opa/secrets/bundle-token")) -}}
{{- end -}}
{{- $cfg := dict
      "services" (dict "bundles" $service)
      "bundles" (dict "vvault" (dict "service" "bundles" "resource" $b.resource "persist" false
                   "polling" (dict "min_delay_seconds" $b.pollingMinSeconds "max_delay_seconds" $b.pollingMaxSeconds)
                   "signing" (dict "keyid" $b.signingKeyId)))
      "keys" (dict $b.signingKeyId (dict "algorithm" "ES256" "key" "${BUNDLE_VERIFICATION_KEY}"))
      "decision_logs" (dict "console" false)
      "status" (dict "console" false) -}}
{{- toYaml $cfg -}}
{{- end -}}
