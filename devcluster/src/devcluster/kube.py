"""A small async client for the Kubernetes API, with the admin client certificate.

devcluster is root on its own cluster and needs only a handful of verbs, so it talks
HTTP directly instead of pulling in a full client.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

Obj = dict[str, Any]


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class Kube:
    def __init__(self, *, server: str, ca: Path, cert: Path, key: Path) -> None:
        self.server = server
        self._ssl = ssl.create_default_context(cafile=str(ca))
        self._ssl.load_cert_chain(str(cert), str(key))
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Obj | None = None,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
    ) -> Obj:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if body is not None else {}
        async with self.session.request(
            method,
            self.server + path,
            data=data,
            headers=headers,
            params=params,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                try:
                    message = json.loads(text).get("message", text)
                except ValueError:
                    message = text
                raise ApiError(resp.status, message)
            if resp.content_type != "application/json":
                return {"text": text}
            result: Obj = json.loads(text) if text else {}
            return result

    async def get(self, path: str, **params: str) -> Obj:
        return await self.request("GET", path, params=params or None)

    async def create(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body=body)

    async def apply(self, path: str, body: Obj, *, manager: str = "devcluster") -> Obj:
        """Server-side apply: idempotent create-or-update."""
        return await self.request(
            "PATCH",
            path,
            body=body,
            content_type="application/apply-patch+yaml",
            params={"fieldManager": manager, "force": "true"},
        )

    async def merge_patch(self, path: str, body: Obj) -> Obj:
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json"
        )

    async def delete(self, path: str) -> None:
        try:
            await self.request("DELETE", path)
        except ApiError as e:
            if e.status != 404:
                raise

    async def watch(self, path: str, **selectors: str) -> AsyncIterator[tuple[str, Obj]]:
        """Lists then watches a collection forever; yields (type, object).

        On start and after any break it yields ("SYNC", list) first, so the consumer can
        reconcile from a full list instead of trusting that no event was missed.
        """
        while True:
            try:
                listing = await self.get(path, **selectors)
                yield "SYNC", listing
                rv = listing["metadata"]["resourceVersion"]
                params = {
                    "watch": "1",
                    "resourceVersion": rv,
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": "300",
                    **selectors,
                }
                async with self.session.get(self.server + path, params=params) as resp:
                    if resp.status >= 400:
                        raise ApiError(resp.status, await resp.text())
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        kind = event["type"]
                        if kind == "ERROR":
                            break
                        if kind == "BOOKMARK":
                            continue
                        yield kind, event["object"]
            except (TimeoutError, aiohttp.ClientError, ApiError, ValueError):
                await asyncio.sleep(1)
