{{/*
Names. KubeRay names Pods, Services and the submitter Job after a RayCluster / RayJob / RayService
plus suffixes (-head-svc, -<group>-worker-xxxxx, -xxxxx for a RayJob's cluster), so object names
are kept to 40 characters, leaving them room within the 63 of a DNS label.
*/}}
{{- define "shipyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "shipyard.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A name of at most 40 characters, or a clear error: (list root "what" "name"). */}}
{{- define "shipyard.checkedName" -}}
{{- $what := index . 1 -}}
{{- $name := index . 2 -}}
{{- if gt (len $name) 40 -}}
{{- fail (printf "%s: the object name %q is %d characters long; KubeRay needs at most 40 (shorten the release name, fullnameOverride or the key)" $what $name (len $name)) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "shipyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shipyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shipyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "shipyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "shipyard.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "shipyard.mlflowName" -}}
{{- printf "%s-mlflow" (include "shipyard.fullname" .) -}}
{{- end -}}

{{- define "shipyard.postgresqlName" -}}
{{- printf "%s-postgresql" (include "shipyard.fullname" .) -}}
{{- end -}}

{{/* The tracking URI every Ray process and job submitter gets. */}}
{{- define "shipyard.trackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s:%d" (include "shipyard.mlflowName" .) (int .Values.mlflow.port) -}}
{{- else if regexMatch "://[^/@]*:[^/@]*@" .Values.mlflow.externalUri -}}
{{- fail "mlflow.externalUri: contains a password; give the credentials as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD from a Secret in ray.extraEnv (valueFrom.secretKeyRef) instead" -}}
{{- else if .Values.mlflow.externalUri -}}
{{- .Values.mlflow.externalUri -}}
{{- else -}}
{{- fail "mlflow.externalUri: required when mlflow.enabled is false (the tracking server the Ray containers report to, e.g. http://mlflow.tools:5000)" -}}
{{- end -}}
{{- end -}}

{{- define "shipyard.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Security contexts. Ray pods run as the `ray` user of the Ray images (uid 1000, gid 100), which the
Shipyard image keeps (cluster/README.md, "The image").
*/}}
{{- define "shipyard.rayPodSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 100
  fsGroup: 100
  seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{/* A container securityContext: (dict "uid" 1000 "readOnly" true). */}}
{{- define "shipyard.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .uid }}
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: {{ .readOnly }}
  capabilities: {drop: [ALL]}
{{- end -}}

{{- define "shipyard.secretEnv" -}}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef: {name: {{ index . 1 | quote }}, key: {{ index . 2 | quote }}}
{{- end -}}

{{/* RAY_AUTH_MODE / RAY_AUTH_TOKEN: every Ray process, the autoscaler and the job submitters. */}}
{{- define "shipyard.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: token
{{ include "shipyard.secretEnv" (list "RAY_AUTH_TOKEN" .Values.ray.auth.existingSecret .Values.ray.auth.key) }}
{{- end -}}

{{/* Object-store credentials, from the existing Secret only. */}}
{{- define "shipyard.objectStoreEnv" -}}
{{- $os := .Values.objectStore -}}
{{ include "shipyard.secretEnv" (list "AWS_ACCESS_KEY_ID" $os.existingSecret $os.accessKeyIdKey) }}
{{ include "shipyard.secretEnv" (list "AWS_SECRET_ACCESS_KEY" $os.existingSecret $os.secretAccessKeyKey) }}
{{- if $os.endpointUrlKey }}
{{ include "shipyard.secretEnv" (list "AWS_ENDPOINT_URL" $os.existingSecret $os.endpointUrlKey) }}
{{- end }}
{{- if $os.region }}
- name: AWS_REGION
  value: {{ $os.region | quote }}
{{- end }}
{{- end -}}

{{/* ray.extraEnv, refusing a credential given as a plain value. */}}
{{- define "shipyard.extraEnv" -}}
{{- range $i, $e := .Values.ray.extraEnv }}
{{- if and (regexMatch "(?i)KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL" $e.name) (hasKey $e "value") }}
{{- fail (printf "ray.extraEnv[%d] (%s): a credential must come from a Secret (valueFrom.secretKeyRef), not a value" $i $e.name) }}
{{- end }}
- {{ toYaml $e | nindent 2 | trim }}
{{- end }}
{{- end -}}

{{/* The environment of the Ray containers (head and workers). */}}
{{- define "shipyard.rayEnv" -}}
{{ include "shipyard.rayAuthEnv" . }}
{{ include "shipyard.objectStoreEnv" . }}
- name: MLFLOW_TRACKING_URI
  value: {{ include "shipyard.trackingUri" . | quote }}
- name: SHIPYARD_HOME                 # writable: data caches, embedded fallbacks
  value: /tmp/shipyard
- name: XDG_CACHE_HOME                # torch / triton / pip caches, off the read-only root
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/.config/matplotlib
{{- include "shipyard.extraEnv" . }}
{{- end -}}

{{/* The bearer token of the Serve application (RayService clusters only, when configured). */}}
{{- define "shipyard.serveTokenEnv" -}}
{{- $t := .root.Values.rayService.token -}}
{{- if and .serve $t.existingSecret -}}
{{ include "shipyard.secretEnv" (list "SHIPYARD_SERVE_TOKEN" $t.existingSecret $t.key) }}
{{- end -}}
{{- end -}}

{{- define "shipyard.rayVolumeMounts" -}}
volumeMounts:
  - {name: tmp, mountPath: /tmp}
  - {name: dshm, mountPath: /dev/shm}
{{- end -}}

{{- define "shipyard.rayVolumes" -}}
volumes:
  - name: tmp
    emptyDir: {sizeLimit: {{ .Values.ray.tmpSizeLimit | quote }}}
  - name: dshm                          # Ray's object store lives in shared memory
    emptyDir: {medium: Memory}          # sized to the pod memory limit
{{- end -}}

{{- define "shipyard.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
The resources of a Ray container: the values' cpu/memory plus nvidia.com/gpu when gpus > 0
(Ray takes num-gpus from that limit).
*/}}
{{- define "shipyard.rayResources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (int (default 0 .gpus)) 0 -}}
{{- $_ := set $res.requests "nvidia.com/gpu" (toString .gpus) -}}
{{- $_ := set $res.limits "nvidia.com/gpu" (toString .gpus) -}}
{{- end -}}
resources:
{{- toYaml $res | nindent 2 }}
{{- end -}}

{{/*
A RayCluster spec (RayCluster.spec, RayJob.spec.rayClusterSpec, RayService.spec.rayClusterConfig):
(dict "root" $ "serve" bool). serve adds the Ray Serve port to head and workers.
*/}}
{{- define "shipyard.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $image := include "shipyard.image" $root -}}
{{- $sc := include "shipyard.containerSecurityContext" (dict "uid" 1000 "readOnly" $v.ray.readOnlyRootFilesystem) -}}
rayVersion: {{ $v.ray.version | quote }}
enableInTreeAutoscaling: true           # KubeRay adds the Ray autoscaler as a sidecar of the head
autoscalerOptions:
  upscalingMode: {{ $v.ray.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.ray.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  env:                                  # the autoscaler talks to the GCS: it needs the token
    {{- include "shipyard.rayAuthEnv" $root | nindent 4 }}
  resources:
    {{- toYaml $v.ray.autoscaler.resources | nindent 4 }}
  {{- /* runs no user code: read-only whatever ray.readOnlyRootFilesystem says */}}
  {{- include "shipyard.containerSecurityContext" (dict "uid" 1000 "readOnly" true) | nindent 2 }}
  volumeMounts:
    - {name: tmp, mountPath: /tmp}
headGroupSpec:
  serviceType: {{ $v.ray.head.serviceType }}
  rayStartParams:
    num-cpus: "0"                       # no training on the head
    dashboard-host: "0.0.0.0"
  template:
    metadata:
      labels:
        {{- include "shipyard.labels" $root | nindent 8 }}
        app.kubernetes.io/component: ray-head
    spec:
      {{- include "shipyard.rayPodSecurityContext" $root | nindent 6 }}
      {{- with include "shipyard.imagePullSecrets" $root }}{{ . | trim | nindent 6 }}{{- end }}
      {{- with include "shipyard.scheduling" $v.ray.head }}{{ . | trim | nindent 6 }}{{- end }}
      containers:
        - name: ray-head
          image: {{ $image }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          workingDir: /home/ray/shipyard  # the repo root inside the image
          ports:
            - {name: gcs-server, containerPort: 6379}
            - {name: dashboard, containerPort: 8265}   # dashboard + Jobs API (shipyard submit)
            - {name: client, containerPort: 10001}
            - {name: metrics, containerPort: 8080}
            {{- if .serve }}
            - {name: serve, containerPort: 8000}
            {{- end }}
          env:
            {{- include "shipyard.rayEnv" $root | nindent 12 }}
            {{- with include "shipyard.serveTokenEnv" . }}{{ . | trim | nindent 12 }}{{- end }}
          {{- include "shipyard.rayResources" $v.ray.head | nindent 10 }}
          {{- $sc | nindent 10 }}
          {{- include "shipyard.rayVolumeMounts" $root | nindent 10 }}
      {{- include "shipyard.rayVolumes" $root | nindent 6 }}
workerGroupSpecs:
{{- range $group, $g := $v.ray.workerGroups }}
{{- if not (and (le (int $g.minReplicas) (int $g.replicas)) (le (int $g.replicas) (int $g.maxReplicas))) }}
{{- fail (printf "ray.workerGroups.%s: needs minReplicas <= replicas <= maxReplicas, got %d <= %d <= %d" $group (int $g.minReplicas) (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
  - groupName: {{ $group }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams: {}                  # num-gpus comes from the nvidia.com/gpu limit
    template:
      metadata:
        labels:
          {{- include "shipyard.labels" $root | nindent 10 }}
          app.kubernetes.io/component: {{ printf "ray-worker-%s" $group }}
      spec:
        {{- include "shipyard.rayPodSecurityContext" $root | nindent 8 }}
        {{- with include "shipyard.imagePullSecrets" $root }}{{ . | trim | nindent 8 }}{{- end }}
        {{- with include "shipyard.scheduling" $g }}{{ . | trim | nindent 8 }}{{- end }}
        containers:
          - name: ray-worker
            image: {{ $image }}
            imagePullPolicy: {{ $v.image.pullPolicy }}
            workingDir: /home/ray/shipyard
            {{- if $.serve }}
            ports:
              - {name: serve, containerPort: 8000}
            {{- end }}
            env:
              {{- include "shipyard.rayEnv" $root | nindent 14 }}
              {{- with include "shipyard.serveTokenEnv" $ }}{{ . | trim | nindent 14 }}{{- end }}
            {{- include "shipyard.rayResources" $g | nindent 12 }}
            {{- $sc | nindent 12 }}
            {{- include "shipyard.rayVolumeMounts" $root | nindent 12 }}
        {{- include "shipyard.rayVolumes" $root | nindent 8 }}
{{- end }}
{{- end -}}
