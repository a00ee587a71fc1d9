"""The SDK's typed objects (``zimage_client.objects``, its own distribution, which cannot import the service) name
exactly the fields the API's response models do: a field added to one and not the other fails here."""

from __future__ import annotations

import typing

import pytest
from pydantic import BaseModel

from api.routes.adapters import AdapterObject
from api.routes.batches import BatchCounts, BatchObject
from api.routes.uploads import UploadObject
from core import schemas
from zimage_client import objects

PAIRS = [
    (objects.Job, schemas.JobObject),
    (objects.Output, schemas.Output),
    (objects.JobError, schemas.JobError),
    (objects.Progress, schemas.Progress),
    (objects.Batch, BatchObject),
    (objects.Counts, BatchCounts),
    (objects.Upload, UploadObject),
    (objects.Adapter, AdapterObject),
]


@pytest.mark.parametrize(("sdk", "server"), PAIRS, ids=[server.__name__ for _, server in PAIRS])
def test_the_sdk_object_names_the_server_models_fields(sdk: type, server: type[BaseModel]) -> None:
    assert set(typing.get_type_hints(sdk)) == set(server.model_fields)
