#!/usr/bin/env bash
# curl against a local llm-server (start it with: uv run llm-server serve).
set -euo pipefail
URL=${LLM_SERVER_URL:-http://127.0.0.1:8000}
KEY=${LLM_SERVER_API_KEY:-none}
MODEL=${LLM_SERVER_MODEL:-tiny-chat}

curl -sS "$URL/v1/models" -H "Authorization: Bearer $KEY"; echo
curl -sS "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}], \"max_tokens\": 16}"; echo
# Streaming: -N turns off curl's buffering so each "data:" frame shows as it arrives.
curl -sSN "$URL/v1/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Count to five.\"}], \"max_tokens\": 16, \"stream\": true}"
curl -sS "$URL/v1/generate" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0}'; echo
