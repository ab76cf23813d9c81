"""LangChain's ChatOpenAI against a local llm-server.

Run the server first (``uv run llm-server serve``), then ``uv run python -m clients.langchain_chat``.
"""

from __future__ import annotations

import os

from langchain_openai import ChatOpenAI
from pydantic import SecretStr


def main() -> None:
    llm = ChatOpenAI(
        model=os.environ.get("LLM_SERVER_MODEL", "tiny-chat"),
        base_url=os.environ.get("LLM_SERVER_URL", "http://127.0.0.1:8000") + "/v1",
        api_key=SecretStr(os.environ.get("LLM_SERVER_API_KEY", "none")),
        temperature=0,
        max_completion_tokens=32,
        stream_usage=True,
    )
    print("invoke:", llm.invoke("Say hello.").content)
    print("stream: ", end="")
    for chunk in llm.stream("Count to five."):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
