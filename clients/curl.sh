#!/usr/bin/env bash
# curl against a local llm-server (start it with: uv run llm-server serve).
# Reads the variables the openai SDK reads (OPENAI_API_KEY, OPENAI_BASE_URL) and MODEL, the model to call.
set -euo pipefail
BASE_URL=${OPENAI_BASE_URL:-http://127.0.0.1:8000/v1}
KEY=${OPENAI_API_KEY:?set OPENAI_API_KEY to a key from: uv run llm-server keys create --name me}
MODEL=${MODEL:-tiny-chat}

curl -sS "$BASE_URL/models" -H "Authorization: Bearer $KEY"; echo
curl -sS "$BASE_URL/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}], \"max_tokens\": 16}"; echo
# Streaming: -N turns off curl's buffering so each "data:" frame shows as it arrives.
curl -sSN "$BASE_URL/chat/completions" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"messages\": [{\"role\": \"user\", \"content\": \"Count to five.\"}], \"max_tokens\": 16, \"stream\": true}"
# The native route (not OpenAI's): the first served model unless "model" is given.
curl -sS "$BASE_URL/generate" -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" \
  -d '{"prompt": "Once upon a time", "max_new_tokens": 16, "temperature": 0}'; echo
