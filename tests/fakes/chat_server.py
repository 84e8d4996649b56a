"""An in-process OpenAI-compatible chat server for judge tests: real HTTP, scripted behaviour.

By default it answers like a judge that reads the fenced response and gives a high score when it
contains "GOOD", a low one otherwise, in the JSON the request's schema asks for. A script of faults
(status codes, delays, garbage, dropped connections) can be queued in front of the default answer.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    status: int = 200
    body: str | None = None  # raw body to send instead of a completion
    delay: float = 0.0
    drop: bool = False  # close the connection without answering
    headers: dict[str, str] = field(default_factory=dict)  # e.g. Retry-After


@dataclass
class ChatServerState:
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # the request headers, in order
    refuse_response_format: bool = False
    answer_text: str | None = None  # fixed completion text, e.g. something unparseable
    lock: threading.Lock = field(default_factory=threading.Lock)


def judge_answer(body: dict[str, Any]) -> str:
    """A deterministic verdict: every fenced candidate containing GOOD scores 9, others 2."""
    user = body["messages"][-1]["content"]
    schema = (body.get("response_format") or {}).get("json_schema", {}).get("schema", {})
    properties = schema.get("properties", {})
    if "scores" in properties:
        labels = list(properties["scores"]["properties"])
        blocks = _candidate_blocks(user, labels)
        return json.dumps(
            {"rationale": "compared", "scores": {k: 9 if "GOOD" in v else 2 for k, v in blocks.items()}}
        )
    return json.dumps({"rationale": "read it", "score": 9 if "GOOD" in user.split("RESPONSE", 1)[-1] else 2})


def _candidate_blocks(text: str, labels: list[str]) -> dict[str, str]:
    blocks = {}
    for label in labels:
        match = re.search(rf"CANDIDATE {label}\b(.*?)(?:CANDIDATE [A-Z]\b|$)", text, re.S)
        blocks[label] = match.group(1) if match else ""
    return blocks


class _Handler(BaseHTTPRequestHandler):
    state: ChatServerState

    def log_message(self, *_: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.state.lock:
            self.state.requests.append(body)
            self.state.headers.append({k.lower(): v for k, v in self.headers.items()})
            fault = self.state.faults.popleft() if self.state.faults else None
        if fault is not None:
            time.sleep(fault.delay)
            if fault.drop:
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if fault.status != 200 or fault.body is not None:
                payload = fault.body or json.dumps({"error": "scripted"})
                return self._send(fault.status, payload, fault.headers)
        if self.state.refuse_response_format and "response_format" in body:
            return self._send(400, json.dumps({"error": "response_format is not supported"}))
        text = self.state.answer_text if self.state.answer_text is not None else judge_answer(body)
        completion = {
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20},
        }
        self._send(200, json.dumps(completion))

    def _send(self, status: int, payload: str, headers: dict[str, str] | None = None) -> None:
        data = payload.encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ChatServer:
    def __init__(self, *, keep_alive: bool = False) -> None:
        """`keep_alive`: HTTP/1.1, connections stay open between requests, as vLLM's server does."""
        self.state = ChatServerState()
        protocol = "HTTP/1.1" if keep_alive else "HTTP/1.0"
        handler = type("Handler", (_Handler,), {"state": self.state, "protocol_version": protocol})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
