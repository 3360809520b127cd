"""The HTTP API beside the native routes: shared request plumbing, the OpenAI-compatible routes, the
OpenAPI document and the browser playground."""
