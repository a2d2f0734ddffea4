"""POST /v1/task with photos: the demo card and its photos as multipart/form-data load; a
missing, bad or extra photo, or an upload over the limit, is refused in one line naming the
card field, and the service keeps the card it had."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from gazecam.assist.tasks import MAX_PHOTO_SIDE_PX
from tests.server.conftest import DEMO_CARD, LOCAL, card_upload, first_crop

UPLOAD_LIMIT = 200_000  # the demo card and its six photos take about 110 kB


@pytest.fixture(scope="module")
def client(make_app: Callable[..., FastAPI]) -> Iterator[TestClient]:
    with TestClient(make_app(max_task_upload_bytes=UPLOAD_LIMIT), base_url=LOCAL) as client:
        first_crop(client)
        yield client


BREW_TEA = b"name: Brew tea\nsteps:\n  - {title: Boil water, instruction: Fill the kettle.}\n"


@pytest.fixture
def tea(client: TestClient) -> Iterator[dict[str, object]]:
    """A card without photos loaded first: what a refused upload must leave in place."""
    assert client.post("/v1/task", content=BREW_TEA).status_code == 200
    before = client.get("/v1/status").json()["task"]
    assert before["name"] == "Brew tea" and before["photos"] == 0
    yield before


def test_the_demo_card_and_its_photos_load_as_multipart(
    client: TestClient, tea: dict[str, object]
) -> None:
    upload = card_upload(DEMO_CARD)
    assert len(upload) == 7 and sum(len(data) for _, data in upload.values()) < UPLOAD_LIMIT
    response = client.post("/v1/task", files=upload)
    assert response.status_code == 200, response.json()
    assert response.json()["name"] == "Reset the control box"
    task = client.get("/v1/status").json()["task"]
    assert task["name"] == "Reset the control box" and task["steps"] == 6
    assert task["photos"] == 6 and task["warning"] is None  # the classifier embedded them


def refused(client: TestClient, before: object, files: dict[str, tuple[str, bytes]]) -> str:
    """The one-line message of a refused upload, after checking that the card was kept."""
    response = client.post("/v1/task", files=files)
    assert response.status_code == 400, response.json()
    message = str(response.json()["message"])
    assert response.json()["code"] == "bad_request" and "\n" not in message
    assert client.get("/v1/status").json()["task"] == before
    return message


def test_a_photo_that_is_not_an_image_is_refused_naming_its_field(
    client: TestClient, tea: object
) -> None:
    upload = card_upload(DEMO_CARD) | {"demo_photos/step2.jpg": ("step2.jpg", b"GIF89a? no")}
    assert refused(client, tea, upload) == (
        "task card: steps.2.cues.images.1 'demo_photos/step2.jpg': not an image"
    )


def test_a_photo_not_uploaded_is_refused_naming_its_field(client: TestClient, tea: object) -> None:
    upload = card_upload(DEMO_CARD)
    del upload["demo_photos/step4.jpg"]
    assert refused(client, tea, upload) == (
        "task card: steps.4.cues.images.1 'demo_photos/step4.jpg': cannot read it "
        "(no uploaded part of that name)"
    )
    # Nor can a card that names photos come as plain YAML.
    response = client.post("/v1/task", content=DEMO_CARD.read_bytes())
    assert response.status_code == 400
    assert response.json()["message"].startswith("task card: steps.1.cues.images.1 ")


def test_an_upload_with_a_photo_no_step_names_or_no_card_is_refused(
    client: TestClient, tea: object
) -> None:
    upload = card_upload(DEMO_CARD)
    extra = upload | {"demo_photos/step7.jpg": upload["demo_photos/step1.jpg"]}
    assert refused(client, tea, extra) == (
        "task card: no step names the photo 'demo_photos/step7.jpg'"
    )
    del upload["card"]
    assert refused(client, tea, upload) == "task card upload: no part named 'card'"


def test_an_upload_over_the_limit_is_refused_and_the_card_kept(
    client: TestClient, tea: object
) -> None:
    upload = card_upload(DEMO_CARD) | {"demo_photos/step1.jpg": ("x.jpg", b"\xff" * UPLOAD_LIMIT)}
    response = client.post("/v1/task", files=upload)
    assert response.status_code == 413
    assert response.json()["message"] == f"body longer than {UPLOAD_LIMIT} bytes"
    assert client.get("/v1/status").json()["task"] == tea


def test_a_photo_over_the_pixel_limit_is_refused_naming_its_field(
    client: TestClient, tea: object
) -> None:
    wide = cv2.imencode(".png", np.zeros((2, MAX_PHOTO_SIDE_PX + 1, 3), np.uint8))[1].tobytes()
    upload = card_upload(DEMO_CARD) | {"demo_photos/step6.jpg": ("step6.jpg", wide)}
    response = client.post("/v1/task", files=upload)
    assert response.status_code == 413
    assert response.json()["message"] == (
        f"task card: steps.6.cues.images.1 'demo_photos/step6.jpg': {MAX_PHOTO_SIDE_PX + 1}×2 "
        f"px, a photo may be at most {MAX_PHOTO_SIDE_PX} px on a side"
    )
    assert client.get("/v1/status").json()["task"] == tea
