"""The probe suite: attacks an abuser would try, run against `cardcheck up` as real processes
(`pytest -m probe`). Each probe module may set `MESH_ARGS` (arguments of `cardcheck up`) and
`MESH_ENV` (extra environment) for the mesh it gets; the mesh is shared by that module's tests
and stopped with SIGTERM after them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from cardcheck import dataset
from cardcheck.cli.demo import Journey
from cardcheck.v1 import common_pb2, gateway_pb2
from tests.harness.mesh import Mesh, start_mesh

PAYMENT_PASSWORD = "258013"


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "/probes/" in str(item.fspath):
            item.add_marker(pytest.mark.probe)
            item.add_marker(pytest.mark.e2e)


def registrable_people(records: list[dataset.CardRecord] | None = None) -> list[dataset.Person]:
    """Everyone in the mesh's dataset (the generated default unless given) who can register: an
    ACTIVE, card-not-present-enabled card with a reserved phone, in a known region; file order."""
    records = records if records is not None else dataset.generate(dataset.DEFAULT_SEED, dataset.DEFAULT_PEOPLE)
    people: dict[str, dataset.Person] = {}
    for record in records:
        key = record.id_number.upper()
        region = dataset.region_of(key)
        if (
            key in people
            or region is None
            or record.status != "ACTIVE"
            or not record.cnp_enabled
            or record.reserved_phone is None
        ):
            continue
        people[key] = dataset.Person(record.holder_name, key, record.reserved_phone, record.pan, region)
    return list(people.values())


@pytest.fixture(scope="module")
def probe_mesh(request, tmp_path_factory) -> Iterator[Mesh]:
    module = request.module
    mesh = start_mesh(
        tmp_path_factory.mktemp("probe-mesh"),
        *getattr(module, "MESH_ARGS", ()),
        extra_env=dict(getattr(module, "MESH_ENV", {})),
    )
    try:
        yield mesh
    finally:
        assert mesh.stop() == 0, mesh.output()


@contextlib.asynccontextmanager
async def journey_of(mesh: Mesh, person: dataset.Person, password: str = PAYMENT_PASSWORD) -> AsyncIterator[Journey]:
    """A client of the public API (and of the sandbox inbox) acting as `person`."""
    journey = Journey(mesh.settings, person, password)
    try:
        yield journey
    finally:
        await journey.close()


async def register(journey: Journey) -> gateway_pb2.Session:
    """Registers the journey's person through the public API and signs its calls in."""
    person = journey.person
    challenge_id, code = await journey.sms_code(common_pb2.SMS_PURPOSE_REGISTER)
    session = await journey.call(
        journey.gateway.Register,
        gateway_pb2.RegisterRequest(
            name=person.name, id_number=person.id_number, phone=person.phone, challenge_id=challenge_id,
            sms_code=code, card_number=person.card_number, payment_password=journey.payment_password,
            region=person.region,
        ),
    )
    journey.metadata = (("authorization", f"Bearer {session.session_token}"),)
    return session
