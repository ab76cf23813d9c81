"""The official openai SDK against a local llm-server: non-streaming and streaming chat.

Run the server first (``uv run llm-server serve``), then ``uv run python -m clients.openai_sdk``. The SDK reads
``OPENAI_API_KEY``; ``OPENAI_BASE_URL`` defaults to the local server and ``MODEL`` (the model to call) to
``tiny-chat``.
"""

from __future__ import annotations

import os

from openai import OpenAI


def main() -> None:
    client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    model = os.environ.get("MODEL", "tiny-chat")
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=32, temperature=0
    )
    print("non-streaming:", reply.choices[0].message.content, reply.usage)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    print("streaming: ", end="")
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
        elif chunk.usage:
            print("\nusage:", chunk.usage)


if __name__ == "__main__":
    main()
