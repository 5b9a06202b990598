{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "hsissl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "hsissl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>", e.g. include "hsissl.componentName" (list . "mlflow") */}}
{{- define "hsissl.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "hsissl.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{/* Labels --------------------------------------------------------------------------------- */}}

{{- define "hsissl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "hsissl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hsissl
{{- end -}}

{{/* Selector labels of one component: include "hsissl.selectorLabels" (list . "mlflow") */}}
{{- define "hsissl.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "hsissl.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* All labels of one component's objects */}}
{{- define "hsissl.componentLabels" -}}
{{ include "hsissl.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The label that marks pipeline pods; the network policies admit pods carrying it. */}}
{{- define "hsissl.pipelineLabelKey" -}}hsissl.io/pipeline{{- end -}}

{{/* Images: always repository[:tag]@digest (the schema requires the digest). ------------------ */}}

{{- define "hsissl.image" -}}
{{- if not .digest -}}
{{- fail (printf "image %s has no digest: every image must be pinned as sha256:<64 hex>" .repository) -}}
{{- end -}}
{{- if .tag -}}
{{- printf "%s:%s@%s" .repository .tag .digest -}}
{{- else -}}
{{- printf "%s@%s" .repository .digest -}}
{{- end -}}
{{- end -}}

{{/* "imagePullSecrets: ..." or nothing */}}
{{- define "hsissl.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets -}}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* Annotations of every pod the chart makes (podAnnotations: by default no Istio sidecar,
     which would keep the bucket Job from completing and is not needed in-namespace). */}}
{{- define "hsissl.podAnnotations" -}}
{{- with .Values.podAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
{{- end -}}

{{/* Security contexts (Pod Security Standard "restricted"). ------------------------------------ */}}

{{/* include "hsissl.podSecurityContext" <uid> */}}
{{- define "hsissl.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ . }}
  runAsGroup: {{ . }}
  fsGroup: {{ . }}
  fsGroupChangePolicy: OnRootMismatch
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{- define "hsissl.containerSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/* Service endpoints ------------------------------------------------------------------------ */}}

{{- define "hsissl.svcHost" -}}
{{- $root := index . 0 -}}
{{- printf "%s.%s.svc.%s" (index . 1) $root.Release.Namespace $root.Values.clusterDomain -}}
{{- end -}}

{{- define "hsissl.mlflow.url" -}}
{{- $svc := include "hsissl.componentName" (list . "mlflow") -}}
{{- printf "http://%s:%d" (include "hsissl.svcHost" (list . $svc)) (int .Values.mlflow.service.port) -}}
{{- end -}}

{{- define "hsissl.s3.endpoint" -}}
{{- if .Values.objectStorage.minio.enabled -}}
{{- $svc := include "hsissl.componentName" (list . "minio") -}}
{{- printf "http://%s:9000" (include "hsissl.svcHost" (list . $svc)) -}}
{{- else -}}
{{- .Values.objectStorage.external.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "hsissl.postgres.host" -}}
{{- include "hsissl.svcHost" (list . (include "hsissl.componentName" (list . "postgres"))) -}}
{{- end -}}

{{/* Secrets: existingSecret, else the chart's generated one. --------------------------------- */}}

{{/* Key names in the S3 Secret: fixed, because the compiled pipeline references exactly these
     (components/options.py S3_SECRET_KEYS; tests/test_deploy_cluster.py checks they agree). */}}
{{- define "hsissl.s3.accessKeyIdKey" -}}AWS_ACCESS_KEY_ID{{- end -}}
{{- define "hsissl.s3.secretAccessKeyKey" -}}AWS_SECRET_ACCESS_KEY{{- end -}}

{{- define "hsissl.mlflow.secretName" -}}
{{- default (include "hsissl.componentName" (list . "mlflow")) .Values.mlflow.auth.existingSecret -}}
{{- end -}}

{{- define "hsissl.s3.secretName" -}}
{{- default (include "hsissl.componentName" (list . "s3")) .Values.objectStorage.credentials.existingSecret -}}
{{- end -}}

{{- define "hsissl.postgres.secretName" -}}
{{- default (include "hsissl.componentName" (list . "postgres")) .Values.postgres.auth.existingSecret -}}
{{- end -}}

{{- define "hsissl.pipeline.serviceAccountName" -}}
{{- default (include "hsissl.componentName" (list . "pipeline")) .Values.pipeline.serviceAccount.name -}}
{{- end -}}

{{/* Cross-field checks the schema cannot express; included once, from NOTES-independent
     templates (configmap-pipeline.yaml), so every render runs them. ----------------------- */}}
{{- define "hsissl.validate" -}}
{{- $os := .Values.objectStorage -}}
{{- if and $os.minio.enabled $os.external.endpoint -}}
{{- fail (printf "objectStorage: minio.enabled is true and external.endpoint is %q; choose one (set objectStorage.minio.enabled=false to use the external endpoint)" $os.external.endpoint) -}}
{{- end -}}
{{- if and (not $os.minio.enabled) (not $os.external.endpoint) -}}
{{- fail "objectStorage: minio.enabled is false and external.endpoint is empty; set objectStorage.external.endpoint (e.g. http://seaweedfs.kubeflow.svc.cluster.local:8333)" -}}
{{- end -}}
{{- if and (not $os.minio.enabled) (not $os.credentials.existingSecret) -}}
{{- fail "objectStorage.credentials.existingSecret is empty: an external S3 endpoint needs a Secret with its access key id and secret access key (keys AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)" -}}
{{- end -}}
{{- if and $os.minio.enabled (not $os.credentials.existingSecret) (not .Values.credentials.generate) -}}
{{- fail "objectStorage.credentials.existingSecret is empty and credentials.generate is false: create a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY and set objectStorage.credentials.existingSecret" -}}
{{- end -}}
{{- $ext := .Values.mlflow.backendStore.external.existingSecret -}}
{{- if and .Values.postgres.enabled $ext -}}
{{- fail (printf "mlflow.backendStore.external.existingSecret is %q while postgres.enabled is true; choose one (set postgres.enabled=false to use the external backend)" $ext) -}}
{{- end -}}
{{- if and (not .Values.postgres.enabled) (not $ext) -}}
{{- fail "postgres.enabled is false and mlflow.backendStore.external.existingSecret is empty: MLflow needs a backend store; name a Secret holding its SQLAlchemy URI" -}}
{{- end -}}
{{- if and .Values.postgres.enabled (not .Values.postgres.auth.existingSecret) (not .Values.credentials.generate) -}}
{{- fail "postgres.auth.existingSecret is empty and credentials.generate is false: create a Secret with the PostgreSQL password (key postgres.auth.passwordKey) and set postgres.auth.existingSecret" -}}
{{- end -}}
{{- end -}}
