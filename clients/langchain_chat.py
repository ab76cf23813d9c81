"""LangChain's ChatOpenAI against a local llm-server.

Run the server first (``uv run llm-server serve``), then ``uv run python -m clients.langchain_chat``. ChatOpenAI
reads ``OPENAI_API_KEY``; ``OPENAI_BASE_URL`` defaults to the local server and ``MODEL`` (the model to call) to
``tiny-chat``.
"""

from __future__ import annotations

import os

from langchain_openai import ChatOpenAI


def main() -> None:
    llm = ChatOpenAI(
        model=os.environ.get("MODEL", "tiny-chat"),
        base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
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
