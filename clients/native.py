"""A small typed client for ``/v1/generate`` and ``/v1/stream``."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import msgspec

from schemas.native.generate import GenerateRequest, GenerateResponse, StreamEvent
from schemas.openai.errors import ErrorResponse


class NativeClientError(Exception):
    """The server answered with an OpenAI-style error."""

    def __init__(self, status: int, error: ErrorResponse) -> None:
        super().__init__(f"{status} {error.error.type}: {error.error.message}")
        self.status = status
        self.error = error


class NativeClient:
    """Calls the native routes of an llm-server.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: Sent as ``Authorization: Bearer``.
        http: An ``httpx.Client`` to use instead of a new one (tests pass an in-process client).
    """

    def __init__(self, base_url: str, api_key: str = "none", http: httpx.Client | None = None) -> None:
        self._http = http or httpx.Client(base_url=base_url, timeout=600)
        self._headers = {"Authorization": f"Bearer {api_key}"}

    def generate(self, request: GenerateRequest) -> GenerateResponse:
        """One prompt in, the whole output back."""
        r = self._http.post("/v1/generate", content=msgspec.json.encode(request), headers=self._json_headers())
        self._raise_for(r.status_code, r.content)
        return msgspec.json.decode(r.content, type=GenerateResponse)

    def stream(self, request: GenerateRequest) -> Iterator[StreamEvent]:
        """Events as they are generated; the last has ``finish_reason`` and ``usage``."""
        body = msgspec.json.encode(request)
        with self._http.stream("POST", "/v1/stream", content=body, headers=self._json_headers()) as r:
            if r.status_code != 200:
                r.read()
                self._raise_for(r.status_code, r.content)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return
                if data.startswith('{"error"'):
                    self._raise_for(500, data.encode())
                yield msgspec.json.decode(data, type=StreamEvent)

    def _json_headers(self) -> dict[str, str]:
        return {**self._headers, "Content-Type": "application/json"}

    @staticmethod
    def _raise_for(status: int, content: bytes) -> None:
        if status == 200 and not content.startswith(b'{"error"'):
            return
        raise NativeClientError(status, msgspec.json.decode(content, type=ErrorResponse))


if __name__ == "__main__":  # pragma: no cover - example
    client = NativeClient("http://127.0.0.1:8000")
    print(client.generate(GenerateRequest(prompt="Once upon a time", max_new_tokens=16, temperature=0)))
    for event in client.stream(GenerateRequest(prompt="Once upon a time", max_new_tokens=16)):
        print(event.output, end="", flush=True)
    print()
