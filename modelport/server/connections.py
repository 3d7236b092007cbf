"""uvicorn's httptools protocol with the timeouts it lacks, against slow clients.

- read timeout: a request's headers and body must arrive within ``read_timeout_s`` of its first
  chance to start (connection open, or the previous response sent). uvicorn's keep-alive timer
  is reset by every byte, so a client trickling one header byte at a time would hold a
  connection (and a file descriptor) forever.
- write timeout: a client that stops reading its responses is cut off once the socket's send
  buffer has stayed full for ``write_timeout_s``, instead of holding the response task forever.

It also answers requests the HTTP parser rejects (an unknown method, a malformed request line) in
the same JSON error shape as every other error, instead of uvicorn's plain text.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def protocol_class(read_timeout_s: float, write_timeout_s: float) -> type:
    class TimedHttpToolsProtocol(HttpToolsProtocol):
        _read_timer = None
        _write_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_read()

        def on_message_complete(self) -> None:
            self._cancel("_read_timer")
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_read()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout_s, self._give_up)

        def resume_writing(self) -> None:
            self._cancel("_write_timer")
            super().resume_writing()

        def connection_lost(self, exc) -> None:
            self._cancel("_read_timer")
            self._cancel("_write_timer")
            super().connection_lost(exc)

        def _arm_read(self) -> None:
            self._cancel("_read_timer")
            self._read_timer = self.loop.call_later(read_timeout_s, self._give_up)

        def _cancel(self, name: str) -> None:
            timer = getattr(self, name)
            if timer is not None:
                timer.cancel()
                setattr(self, name, None)

        def send_400_response(self, msg: str) -> None:
            body = json.dumps({"error": f"malformed HTTP request: {msg}", "kind": "bad_input"}).encode()
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

        def _give_up(self) -> None:
            self._read_timer = self._write_timer = None
            if not self.transport.is_closing():
                self.transport.abort()

    return TimedHttpToolsProtocol
