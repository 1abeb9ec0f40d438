"""Keys on ``/v1/messages``: ``x-api-key`` (what the anthropic client sends) like a Bearer key, and the gateway's
refusal in Anthropic's error shape."""

from __future__ import annotations

from pathlib import Path

import anthropic
import httpx
import pytest

from gallama_kernel.testing import RunningServer


def test_x_api_key_is_checked_and_refusals_have_anthropics_shape(tmp_path: Path) -> None:
    with RunningServer(tmp_path, env={"GALLAMA_API_KEYS": "messages-key"}) as server:
        allowed = anthropic.Anthropic(base_url=server.base_url, api_key="messages-key", max_retries=0, timeout=60)
        reply = allowed.messages.create(model="smollm2", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        assert reply.type == "message"
        refused = anthropic.Anthropic(base_url=server.base_url, api_key="wrong-key", max_retries=0, timeout=60)
        with pytest.raises(anthropic.AuthenticationError) as caught:
            refused.messages.count_tokens(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
        assert caught.value.body["type"] == "error"
        assert caught.value.body["error"]["type"] == "authentication_error"
        missing = httpx.post(f"{server.base_url}/v1/messages", json={"model": "smollm2", "max_tokens": 2,
                                                                     "messages": [{"role": "user", "content": "x"}]})
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
