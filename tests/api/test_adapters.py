"""/v1/adapters on the real app, Postgres and SeaweedFS: LoRA files streamed to S3 while checked, hostile and
mismatched files refused with nothing left behind, list / read / delete, tenant isolation, URL uploads."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import math
import pickle
import struct
import threading
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, text

from api.adapter_writer import PART_BYTES
from api.main import create_app
from core import storage
from core.adapter_shapes import linear_layers
from core.apikeys import hash_key
from core.models import adapters
from core.settings import Settings
from deploy.tiny_adapter import build_tiny_adapter, random_lora, save_lora
from tests.helpers.api import auth

URL = "/v1/adapters"
Q = "layers.0.attention.to_q"


def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, run_sweeper=False)) as c:
        yield c


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[TestClient]:
    yield from app_client(settings)


@pytest.fixture(scope="module")
def s3(settings: Settings) -> Any:
    return storage.make_s3_client(settings)


@pytest.fixture(scope="module")
def layers(tiny_turbo_dir: Path) -> dict[str, tuple[int, int]]:
    """The served (tiny) transformer's linear layers."""
    return linear_layers(json.loads((tiny_turbo_dir / "transformer" / "config.json").read_text()))


@pytest.fixture(scope="module")
def tiny(tiny_turbo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A peft LoRA (rank 4) on the served tiny transformer, as diffusers saves one."""
    return build_tiny_adapter(tiny_turbo_dir, tmp_path_factory.mktemp("adapters") / "tiny.safetensors").read_bytes()


def tensors_file(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def pair(layers: dict[str, tuple[int, int]], module: str = Q, rank: int = 4) -> dict[str, torch.Tensor]:
    fan_in, fan_out = layers[module]
    return {
        f"transformer.{module}.lora_A.weight": torch.randn(rank, fan_in),
        f"transformer.{module}.lora_B.weight": torch.randn(fan_out, rank),
    }


def upload(client: TestClient, key: str, data: bytes, filename: str = "style.safetensors", **form: str) -> Any:
    return client.post(URL, files={"file": (filename, data, "application/octet-stream")}, data=form, headers=auth(key))


def tenant_of(db: Engine, key: str) -> str:
    with db.connect() as conn:
        return str(
            conn.execute(text("SELECT tenant_id FROM api_keys WHERE key_hash = :h"), {"h": hash_key(key)}).scalar_one()
        )


def adapter_count(db: Engine, tenant: str) -> int:
    with db.connect() as conn:
        return int(conn.execute(select(func.count()).where(adapters.c.tenant_id == tenant)).scalar_one())


def stored_under(s3: Any, settings: Settings, tenant: str) -> list[str]:
    """Objects and unfinished multipart uploads under the tenant's adapter prefix."""
    prefix = f"adapters/{tenant}/"
    objects = s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix=prefix).get("Contents") or []
    pending = s3.list_multipart_uploads(Bucket=settings.s3_bucket, Prefix=prefix).get("Uploads") or []
    return [o["Key"] for o in objects] + [f"pending:{u['Key']}" for u in pending]


def assert_error(response: Any, status: int, code: str, field: str | None = "file") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    if field is not None:
        assert field in [d["field"] for d in error["details"]], error
    return error


def refused_leaving_nothing(
    client: TestClient, new_key: Any, db: Engine, s3: Any, settings: Settings, data: bytes, status: int, code: str
) -> dict[str, Any]:
    """Upload ``data`` for a fresh tenant: refused with ``status``, and no row, no object, no pending upload."""
    key = new_key()
    error = assert_error(upload(client, key, data), status, code)
    tenant = tenant_of(db, key)
    assert adapter_count(db, tenant) == 0
    assert stored_under(s3, settings, tenant) == []
    return error


# --- the happy path ---------------------------------------------------------------------------------------


def test_the_tiny_adapter_is_stored_checked_and_described(
    client: TestClient, key: str, tiny: bytes, db: Engine, s3: Any, settings: Settings, layers: dict[str, Any]
) -> None:
    response = upload(client, key, tiny, "brand-style.safetensors")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"].startswith("lora_") and response.headers["location"] == f"{URL}/{body['id']}"
    targets = sorted(m for m in layers if m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "w1", "w2", "w3"))
    targets = sorted(targets + [m for m in layers if m.endswith("to_out.0")])
    assert body == {
        "id": body["id"],
        "object": "adapter",
        "name": "brand-style",
        "bytes": len(tiny),
        "sha256": hashlib.sha256(tiny).hexdigest(),
        "rank": 4,
        "target_modules": targets,
        "created_at": body["created_at"],
    }
    tenant = tenant_of(db, key)
    with db.connect() as conn:
        row = conn.execute(select(adapters).where(adapters.c.id == body["id"])).one()
    assert (row.tenant_id, row.key) == (tenant, storage.adapter_key(tenant, body["id"]))
    assert storage.get_object_bytes(s3, settings.s3_bucket, row.key) == tiny
    assert client.get(response.headers["location"], headers=auth(key)).json() == body


def test_the_name_is_the_given_one_or_the_file_name_or_the_id(client: TestClient, key: str, tiny: bytes) -> None:
    assert upload(client, key, tiny, name="  Spring catalog  ").json()["name"] == "Spring catalog"
    assert upload(client, key, tiny, "C:\\loras\\ink wash.v2.safetensors").json()["name"] == "ink wash.v2"
    unnamed = upload(client, key, tiny, "").json()
    assert unnamed["name"] == unnamed["id"]
    assert_error(upload(client, key, tiny, name="x" * 201), 422, "validation_error", "name")
    assert_error(upload(client, key, tiny, name="a\tb"), 422, "validation_error", "name")


# --- streamed: memory bounded by a part, whatever the file's size ---------------------------------------------


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformer config wide enough that a valid rank-128 adapter on it is ~60 MB (7+ parts)."""
    path = tmp_path_factory.mktemp("wide") / "config.json"
    path.write_text(json.dumps({"dim": 1024, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 8, "n_kv_heads": 8}))
    return path


@pytest.fixture(scope="module")
def big_adapter(wide_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    layers = linear_layers(json.loads(wide_model.read_text()))
    state = random_lora(layers, rank=128, dtype=torch.float32)
    path = save_lora(state, tmp_path_factory.mktemp("big") / "big.safetensors")
    assert path.stat().st_size > 7 * PART_BYTES
    return path


@pytest.fixture(scope="module")
def wide_client(settings: Settings, wide_model: Path) -> Iterator[TestClient]:
    """The app checking adapters against the wide config."""
    yield from app_client(settings.model_copy(update={"adapter_base_config": str(wide_model)}))


async def streamed_form(path: Path, *, cut: int = 0) -> AsyncIterator[bytes]:
    """A multipart body whose file part is read from disk 64 KiB at a time (never whole in memory)."""
    yield b'--B0undary\r\nContent-Disposition: form-data; name="file"; filename="big.safetensors"\r\n\r\n'
    left = path.stat().st_size - cut
    with path.open("rb") as f:
        while left > 0:
            piece = f.read(min(64 << 10, left))
            left -= len(piece)
            yield piece
    yield b"\r\n--B0undary--\r\n"


def post_streamed(client: TestClient, key: str, path: Path, *, cut: int = 0) -> tuple[httpx.Response, int]:
    """POST the file as a streamed multipart body straight to the app (TestClient would read a body whole first),
    on the app's own event loop; the answer, and the peak of memory Python allocated meanwhile (every thread)."""
    app: FastAPI = client.app  # type: ignore[assignment]

    async def send() -> tuple[httpx.Response, int]:
        headers = {**auth(key), "Content-Type": "multipart/form-data; boundary=B0undary"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            tracemalloc.start()
            try:
                response = await http.post(URL, content=streamed_form(path, cut=cut), headers=headers, timeout=300)
                return response, tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()

    assert client.portal is not None
    return client.portal.call(send)


def test_a_large_adapter_streams_to_s3_in_parts_with_memory_bounded_by_a_part(
    wide_client: TestClient, key: str, big_adapter: Path, s3: Any, settings: Settings, db: Engine
) -> None:
    size = big_adapter.stat().st_size
    response, peak = post_streamed(wide_client, key, big_adapter)
    assert response.status_code == 201, response.text
    body = response.json()
    digest = hashlib.sha256(big_adapter.read_bytes()).hexdigest()
    assert (body["bytes"], body["sha256"], body["rank"]) == (size, digest, 128)
    object_key = storage.adapter_key(tenant_of(db, key), body["id"])
    head = s3.head_object(Bucket=settings.s3_bucket, Key=object_key)
    assert head["ContentLength"] == size
    parts = int(head["ETag"].strip('"').rsplit("-", 1)[1])  # a multipart object's ETag counts its parts
    assert math.ceil(size / (PART_BYTES + (1 << 20))) <= parts <= math.ceil(size / PART_BYTES)
    assert storage.object_sha256(s3, settings.s3_bucket, object_key) == digest
    print(f"\nadapter of {size / 2**20:.1f} MiB streamed; peak Python allocation {peak / 2**20:.1f} MiB")
    # About one part is held at a time (the part being sent is the buffer that collected it: no copy).
    assert peak < 1.5 * PART_BYTES < size / 4


def test_a_large_adapter_cut_short_is_refused_after_its_parts_and_leaves_nothing(
    wide_client: TestClient, new_key: Any, big_adapter: Path, s3: Any, settings: Settings, db: Engine
) -> None:
    key = new_key()
    response, _ = post_streamed(wide_client, key, big_adapter, cut=1000)
    error = assert_error(response, 422, "validation_error")
    assert "cut short" in error["message"] and "tensor '" in error["message"]
    tenant = tenant_of(db, key)
    assert adapter_count(db, tenant) == 0
    assert stored_under(s3, settings, tenant) == []  # the multipart upload was aborted


# --- refused files ------------------------------------------------------------------------------------------


def test_pickles_and_zips_are_415(
    client: TestClient, new_key: Any, db: Engine, s3: Any, settings: Settings, layers: dict[str, Any]
) -> None:
    state = pair(layers)
    for data in (pickle.dumps({k: v.tolist() for k, v in state.items()}), torch_save(state), b"hello, adapter\n"):
        error = refused_leaving_nothing(client, new_key, db, s3, settings, data, 415, "unsupported_media_type")
        assert "only .safetensors adapters are accepted" in error["message"]


def torch_save(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_mismatched_files_are_422_naming_the_tensor_and_leave_nothing(
    client: TestClient, new_key: Any, db: Engine, s3: Any, settings: Settings, layers: dict[str, Any], tiny: bytes
) -> None:
    a, b = f"transformer.{Q}.lora_A.weight", f"transformer.{Q}.lora_B.weight"
    good = pair(layers)
    cases = [
        ({**good, a: torch.zeros(4, 63)}, a),  # wrong in_features
        ({**good, b: torch.zeros(4, 4)}, b),  # wrong out_features
        ({**good, "transformer.layers.9.attention.to_q.lora_A.weight": torch.zeros(4, 64)}, "layers.9"),
        ({**good, a: torch.zeros(4, 64, dtype=torch.float64)}, a),
        ({**good, f"transformer.{Q}.dora_scale": torch.zeros(64, 1)}, "dora_scale"),
        ({**good, a: torch.zeros(200, 64), b: torch.zeros(64, 200)}, a),  # rank over max_adapter_rank (128)
    ]
    for tensors, named in cases:
        error = refused_leaving_nothing(
            client, new_key, db, s3, settings, tensors_file(tensors), 422, "validation_error"
        )
        assert named in error["message"] and named in error["details"][0]["message"], error
    header_end = 8 + struct.unpack("<Q", tiny[:8])[0]
    for data, words in (
        (tiny[:-10], "cut short"),
        (tiny + b"\0" * 10, "past its last tensor"),
        (tiny[:header_end], "cut short"),
    ):
        error = refused_leaving_nothing(client, new_key, db, s3, settings, data, 422, "validation_error")
        assert words in error["message"] and "tensor 'transformer." in error["message"]


def test_an_adapter_over_the_limit_is_413(
    settings: Settings, new_key: Any, db: Engine, s3: Any, tiny: bytes, layers: dict[str, Any]
) -> None:
    small = settings.model_copy(update={"max_adapter_bytes": 64 * 1024})
    assert len(tiny) > 64 * 1024
    for capped in app_client(small):
        refused_leaving_nothing(capped, new_key, db, s3, settings, tiny, 413, "payload_too_large")

        def chunked() -> Iterator[bytes]:  # no Content-Length: the stream is cut at the cap
            yield b'--Xb\r\nContent-Disposition: form-data; name="file"; filename="a.safetensors"\r\n\r\n'
            yield tiny
            yield b"\r\n--Xb--\r\n"

        key = new_key()
        headers = {**auth(key), "Content-Type": "multipart/form-data; boundary=Xb"}
        assert_error(capped.post(URL, content=chunked(), headers=headers), 413, "payload_too_large")
        assert stored_under(s3, settings, tenant_of(db, key)) == []
        # A header that promises more than the limit is refused as soon as it is in.
        wide = "transformer.t_embedder.mlp.2"  # (1024 -> 64): rank 128 in F32 is 544 KiB, all of it valid
        entries = {
            f"{wide}.lora_A.weight": {"dtype": "F32", "shape": [128, 1024], "data_offsets": [0, 524288]},
            f"{wide}.lora_B.weight": {"dtype": "F32", "shape": [64, 128], "data_offsets": [524288, 557056]},
        }
        header = json.dumps(entries).encode()
        liar = struct.pack("<Q", len(header)) + header + b"\0" * 100
        error = refused_leaving_nothing(capped, new_key, db, s3, settings, liar, 413, "payload_too_large")
        assert "header says" in error["message"]


def test_a_body_that_is_neither_multipart_nor_json_is_415(client: TestClient, key: str, tiny: bytes) -> None:
    raw = client.post(URL, content=tiny, headers={**auth(key), "Content-Type": "application/octet-stream"})
    assert_error(raw, 415, "unsupported_media_type", "Content-Type")


def test_form_mistakes_are_4xx(client: TestClient, key: str, tiny: bytes) -> None:
    no_file = client.post(URL, files={"weights": ("a.safetensors", tiny)}, headers=auth(key))
    assert_error(no_file, 422, "validation_error", "file")
    twice = client.post(
        URL, files=[("file", ("a.safetensors", tiny)), ("file", ("b.safetensors", tiny))], headers=auth(key)
    )
    assert_error(twice, 422, "validation_error", "file")
    assert_error(client.post(URL, json={"url": 7}, headers=auth(key)), 422, "validation_error", "url")
    assert_error(
        client.post(URL, json={"url": "https://x.example/a", "extra": 1}, headers=auth(key)),
        422,
        "validation_error",
        "extra",
    )
    bad_json = client.post(URL, content=b"{nope", headers={**auth(key), "Content-Type": "application/json"})
    assert_error(bad_json, 400, "bad_request", None)


# --- list, read, delete, tenants ------------------------------------------------------------------------------


def test_list_pages_newest_first_and_get_and_delete(
    client: TestClient, new_key: Any, tiny: bytes, db: Engine, s3: Any, settings: Settings
) -> None:
    key = new_key()
    made = [upload(client, key, tiny, f"a{i}.safetensors").json() for i in range(3)]
    first = client.get(URL, params={"limit": 2}, headers=auth(key)).json()
    assert [a["id"] for a in first["data"]] == [made[2]["id"], made[1]["id"]]
    assert first["data"][0] == made[2]
    second = client.get(URL, params={"limit": 2, "cursor": first["next_cursor"]}, headers=auth(key)).json()
    assert ([a["id"] for a in second["data"]], second["next_cursor"]) == ([made[0]["id"]], None)
    bad_cursor = client.get(URL, params={"cursor": "am9iX2Ex"}, headers=auth(key))  # a job cursor
    assert_error(bad_cursor, 422, "validation_error", "cursor")
    assert_error(client.get(URL, params={"limit": 101}, headers=auth(key)), 422, "validation_error", "limit")

    target = made[1]
    object_key = storage.adapter_key(tenant_of(db, key), target["id"])
    deleted = client.delete(f"{URL}/{target['id']}", headers=auth(key))
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(client.get(f"{URL}/{target['id']}", headers=auth(key)), 404, "not_found", None)
    assert_error(client.delete(f"{URL}/{target['id']}", headers=auth(key)), 404, "not_found", None)
    assert object_key not in stored_under(s3, settings, tenant_of(db, key))
    assert len(client.get(URL, headers=auth(key)).json()["data"]) == 2


def test_another_tenants_adapter_is_404(client: TestClient, new_key: Any, tiny: bytes) -> None:
    owner, stranger = new_key(), new_key()
    made = upload(client, owner, tiny).json()
    assert_error(client.get(f"{URL}/{made['id']}", headers=auth(stranger)), 404, "not_found", None)
    assert_error(client.delete(f"{URL}/{made['id']}", headers=auth(stranger)), 404, "not_found", None)
    assert client.get(URL, headers=auth(stranger)).json() == {"data": [], "next_cursor": None}
    assert client.get(f"{URL}/{made['id']}", headers=auth(owner)).status_code == 200
    assert_error(client.get(f"{URL}/lora_00000000000000000000000000", headers=auth(owner)), 404, "not_found", None)


def test_adapters_need_a_key(client: TestClient, tiny: bytes) -> None:
    response = client.post(URL, files={"file": ("a.safetensors", tiny)})
    assert_error(response, 401, "unauthorized", None)
    assert_error(client.get(URL), 401, "unauthorized", None)


def test_storage_down_is_503_and_nothing_is_recorded(settings: Settings, new_key: Any, db: Engine, tiny: bytes) -> None:
    with contextlib.closing(__import__("socket").socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for down in app_client(settings.model_copy(update={"s3_endpoint_url": dead})):
        key = new_key()
        assert_error(upload(down, key, tiny), 503, "unavailable", None)
        assert adapter_count(db, tenant_of(db, key)) == 0


# --- from a URL ---------------------------------------------------------------------------------------------


class Files(http.server.BaseHTTPRequestHandler):
    """Serves the bytes of ``server.files`` by path."""

    def do_GET(self) -> None:
        data = self.server.files.get(self.path)  # type: ignore[attr-defined]
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data or b"")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def file_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    server.daemon_threads = True
    server.files = {}  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fetching(settings: Settings) -> Iterator[TestClient]:
    """The app with the loopback host allow-listed (http allowed for it, as for image URLs)."""
    yield from app_client(settings.model_copy(update={"fetch_allow_hosts": ["127.0.0.1"]}))


def test_an_adapter_from_a_url_is_fetched_checked_and_stored(
    fetching: TestClient, key: str, tiny: bytes, file_server: Any, db: Engine, s3: Any, settings: Settings
) -> None:
    file_server.files["/loras/ink.safetensors"] = tiny
    url = f"http://127.0.0.1:{file_server.server_port}/loras/ink.safetensors"
    response = fetching.post(URL, json={"url": url}, headers=auth(key))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["bytes"], body["sha256"]) == ("ink", len(tiny), hashlib.sha256(tiny).hexdigest())
    object_key = storage.adapter_key(tenant_of(db, key), body["id"])
    assert storage.get_object_bytes(s3, settings.s3_bucket, object_key) == tiny
    named = fetching.post(URL, json={"url": url, "name": "Ink"}, headers=auth(key)).json()
    assert named["name"] == "Ink"


def test_url_refusals(
    client: TestClient,
    fetching: TestClient,
    new_key: Any,
    tiny: bytes,
    file_server: Any,
    db: Engine,
    s3: Any,
    settings: Settings,
) -> None:
    base = f"http://127.0.0.1:{file_server.server_port}"
    file_server.files["/model.pt"] = pickle.dumps({"a": 1})
    file_server.files["/short.safetensors"] = tiny[:-1]
    key = new_key()
    # Without the allow-list: loopback and plain http are refused, as for image URLs, before any connection.
    assert_error(client.post(URL, json={"url": f"{base}/x"}, headers=auth(key)), 422, "validation_error", "url")
    loopback = client.post(URL, json={"url": "https://127.0.0.1/x.safetensors"}, headers=auth(key))
    assert "loopback" in assert_error(loopback, 422, "validation_error", "url")["message"]
    assert_error(
        fetching.post(URL, json={"url": f"{base}/model.pt"}, headers=auth(key)), 415, "unsupported_media_type", "url"
    )
    assert_error(fetching.post(URL, json={"url": f"{base}/missing"}, headers=auth(key)), 422, "validation_error", "url")
    assert_error(
        fetching.post(URL, json={"url": f"{base}/short.safetensors"}, headers=auth(key)), 422, "validation_error", "url"
    )
    tenant = tenant_of(db, key)
    assert adapter_count(db, tenant) == 0 and stored_under(s3, settings, tenant) == []
    for capped in app_client(
        settings.model_copy(update={"fetch_allow_hosts": ["127.0.0.1"], "max_adapter_bytes": 64 << 10})
    ):
        file_server.files["/big.safetensors"] = tiny
        big = capped.post(URL, json={"url": f"{base}/big.safetensors"}, headers=auth(key))
        assert_error(big, 413, "payload_too_large", "url")


def test_openapi_documents_the_adapter_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"][URL]["post"]
    assert {"multipart/form-data", "application/json"} <= set(post["requestBody"]["content"])
    assert {"201", "409", "413", "415", "422", "503"} <= set(post["responses"])
    assert {"get", "delete"} <= set(spec["paths"][URL + "/{adapter_id}"])
    assert "get" in spec["paths"][URL]
