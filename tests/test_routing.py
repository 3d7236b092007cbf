"""modelport/lifecycle/routing.py in-process, with real services of tiny real models: which
version a request gets (by number, by label, or the newest READY one), what it gets while a version
loads (Unavailable, with a retry time), fails (NotFound, with the reason) or was never there
(NotFound); ``ready`` before the first load; a rollout's pick and ``routed=False``; retiring closes
a service and forgets it; rolling back takes a version out of routing; every change reaches the
observer."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import make_tiny_bundle
from modelport.engine.model import Model
from modelport.engine.service import ModelService
from modelport.errors import BadInput, NotFound, Unavailable
from modelport.lifecycle.rollout import Rollout
from modelport.lifecycle.routing import RoutingTable
from modelport.lifecycle.states import State
from modelport.repository.model_config import RolloutPolicy


class Changes:
    """The routing table's observer: every state_changed(name, version, old, new), in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str | None, str | None]] = []

    def state_changed(self, name, version, old, new) -> None:
        self.seen.append((name, version, old, new))


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture
def services(tmp_path, pool):
    """services(name, version) -> a real ModelService of a tiny model at <tmp>/<name>/<version>."""
    made = []

    def make(name: str, version: int) -> ModelService:
        bundle = make_tiny_bundle(tmp_path / name / str(version), seed=version)
        service = ModelService(Model.load(bundle), decode_pool=pool)
        made.append(service)
        return service

    yield make
    for service in made:
        service.model.close()


def table_with(services, name: str, states: dict[int, str], **kwargs) -> tuple[RoutingTable, dict]:
    """A table, past its first load, holding ``name`` with versions in the given states."""
    routing = RoutingTable(**kwargs)
    routing.ready = True
    made = {}
    for version, state in states.items():
        made[version] = services(name, version) if state == State.READY else None
        routing.set_state(name, version, state, service=made[version])
    return routing, made


# -- before the first load ----------------------------------------------------------------------------

def test_before_the_first_load_an_unknown_model_is_unavailable_and_after_it_not_found():
    routing = RoutingTable()
    assert routing.ready is False
    with pytest.raises(Unavailable, match="still loading") as caught:
        routing.get("m")
    assert caught.value.retry_after_s == 1
    routing.ready = True
    with pytest.raises(NotFound, match="unknown model 'm'"):
        routing.get("m")


def test_before_the_first_load_default_is_unavailable_and_after_it_not_found():
    routing = RoutingTable()
    with pytest.raises(Unavailable) as caught:
        routing.default()
    assert caught.value.retry_after_s == 1
    routing.ready = True
    with pytest.raises(NotFound, match="no model loaded"):
        routing.default()


@pytest.mark.parametrize("name", ["../etc", ".hidden", "a/b", "", "a b", "x" * 129, "é"])
def test_an_invalid_model_name_is_bad_input_even_before_the_first_load(name):
    with pytest.raises(BadInput, match="invalid model name"):
        RoutingTable().get(name)


# -- which version a request gets ---------------------------------------------------------------------

def test_a_request_naming_no_version_gets_the_newest_ready_version(services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY, 3: State.LOADING, 4: State.FAILED})
    for no_version in (None, ""):
        assert routing.get("m", no_version) is made[2]
    assert routing.get("m").version == 2


def test_a_version_is_found_by_its_number_given_as_an_int_or_ascii_digits(services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY})
    assert routing.get("m", 1) is made[1] and routing.get("m", "1") is made[1] and routing.get("m", "01") is made[1]
    assert routing.get("m", 2) is made[2]


@pytest.mark.parametrize("version", ["١", "²", "-1", "../1"])
def test_a_version_of_non_ascii_digits_or_a_sign_is_an_invalid_label(services, version):
    routing, _ = table_with(services, "m", {1: State.READY})
    with pytest.raises(BadInput, match="invalid version label"):
        routing.get("m", version)


@pytest.mark.parametrize("version", [1.0, True, -1])
def test_a_version_that_is_not_a_number_or_label_is_bad_input(services, version):
    routing, _ = table_with(services, "m", {1: State.READY})
    with pytest.raises(BadInput):
        routing.get("m", version)


def test_an_unknown_version_number_is_not_found(services):
    routing, _ = table_with(services, "m", {1: State.READY})
    with pytest.raises(NotFound, match="model 'm' has no version 7 available$"):
        routing.get("m", 7)


def test_a_label_routes_to_the_version_it_names(services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY})
    routing.set_labels("m", {"stable": 1, "canary": 2})
    assert routing.get("m", "stable") is made[1] and routing.get("m", "canary") is made[2]
    assert routing.labels("m") == {"stable": 1, "canary": 2}
    routing.set_labels("m", {"stable": 2})  # a label moves with one assignment
    assert routing.get("m", "stable") is made[2]
    with pytest.raises(NotFound, match="has no version label 'canary'"):
        routing.get("m", "canary")


def test_labels_of_an_unknown_model_are_empty_and_the_labels_returned_are_a_copy(services):
    routing, _ = table_with(services, "m", {1: State.READY})
    assert routing.labels("other") == {}
    routing.set_labels("m", {"stable": 1})
    routing.labels("m")["stable"] = 99
    assert routing.labels("m") == {"stable": 1}


def test_a_label_naming_a_version_that_is_not_loaded_is_not_found(services):
    routing, _ = table_with(services, "m", {1: State.READY})
    routing.set_labels("m", {"stable": 5})
    with pytest.raises(NotFound, match="no version 5 available"):
        routing.get("m", "stable")


# -- versions that are not ready ----------------------------------------------------------------------

def test_a_version_still_loading_is_unavailable_with_a_retry_time(services):
    routing, _ = table_with(services, "m", {1: State.LOADING})
    with pytest.raises(Unavailable, match="version 1 is still loading") as by_number:
        routing.get("m", 1)
    with pytest.raises(Unavailable, match="model 'm' has no version ready$") as by_default:
        routing.get("m")
    assert by_number.value.retry_after_s == 1 and by_default.value.retry_after_s == 1


def test_a_model_whose_only_version_waits_says_what_it_waits_for(services):
    routing, _ = table_with(services, "p", {})
    routing.set_state("p", 1, State.LOADING, "waiting: step 'b': its files are still being written")
    with pytest.raises(Unavailable, match=r"\(version 1 waiting: step 'b': its files are still being written\)"):
        routing.get("p")


def test_a_failed_version_is_not_found_with_its_reason(services):
    routing, _ = table_with(services, "m", {})
    routing.set_state("m", 1, State.FAILED, "model.onnx: not an ONNX graph")
    with pytest.raises(NotFound, match=r"no version 1 available \(model.onnx: not an ONNX graph\)"):
        routing.get("m", 1)
    with pytest.raises(NotFound, match=r"no version available \(version 1 FAILED: model.onnx: not an ONNX graph\)"):
        routing.get("m")


def test_while_one_version_failed_and_another_loads_the_model_is_unavailable_not_missing(services):
    routing, _ = table_with(services, "m", {})
    routing.set_state("m", 1, State.FAILED, "bad graph")
    routing.set_state("m", 2, State.LOADING)
    with pytest.raises(Unavailable):
        routing.get("m")


def test_a_failed_version_does_not_hide_an_older_ready_one(services):
    routing, made = table_with(services, "m", {1: State.READY})
    routing.set_state("m", 2, State.FAILED, "bad graph")
    assert routing.get("m") is made[1]
    with pytest.raises(NotFound, match="bad graph"):
        routing.get("m", 2)


def test_an_unavailable_or_unloading_version_is_not_found(services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY})
    routing.set_state("m", 1, State.UNAVAILABLE, "evicted")
    routing.set_state("m", 2, State.UNLOADING)
    with pytest.raises(NotFound, match=r"no version 1 available \(evicted\)"):
        routing.get("m", 1)
    with pytest.raises(NotFound, match="version 2 is being unloaded"):
        routing.get("m", 2)
    with pytest.raises(NotFound, match="has no version available$"):
        routing.get("m")


# -- a rollout in progress ----------------------------------------------------------------------------

def test_during_a_canary_a_routed_request_gets_the_pick_and_a_question_about_the_model_the_serving_version(
        services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY})
    policy = RolloutPolicy(shadow_requests=0, canary_share=1.0, canary_requests=10)
    rollout = Rollout("m", policy, made[1], made[2], on_end=lambda rollout: None, rng=random.Random(0).random)
    routing.rollouts["m"] = rollout
    rollout.start()
    assert rollout.active
    assert routing.get("m") is made[2]  # every request to the canary (share 1.0)
    assert routing.get("m", routed=False) is made[1]
    assert routing.default(routed=False) is made[1]
    assert routing.get("m", 1) is made[1]  # a version named is a version served
    rollout.roll_back("judged bad")
    assert not rollout.active
    assert routing.get("m") is made[2]  # an ended rollout routes nothing: the newest READY again


# -- what the table lists -----------------------------------------------------------------------------

def test_index_lists_every_version_of_every_model_sorted_with_state_and_reason(services):
    routing, _ = table_with(services, "zeta", {2: State.READY, 10: State.LOADING})
    routing.set_state("alpha", 1, State.FAILED, "bad graph")
    assert routing.index() == [
        {"name": "alpha", "version": "1", "state": "FAILED", "reason": "bad graph"},
        {"name": "zeta", "version": "2", "state": "READY", "reason": ""},
        {"name": "zeta", "version": "10", "state": "LOADING", "reason": ""},
    ]


def test_services_len_and_iteration_count_only_ready_versions(services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.LOADING})
    routing.set_state("n", 1, State.FAILED, "no")
    assert routing.services() == [made[1]] and list(routing) == [made[1]] and len(routing) == 1


def test_versions_of_an_unknown_model_is_not_found_and_known_says_so(services):
    routing, _ = table_with(services, "m", {1: State.READY})
    assert routing.known("m") and not routing.known("n")
    assert set(routing.versions("m")) == {1}
    with pytest.raises(NotFound, match="unknown model 'n'"):
        routing.versions("n")
    with pytest.raises(BadInput):
        routing.versions("../m")


def test_default_is_the_first_model_that_can_answer(services):
    routing, made = table_with(services, "first", {1: State.LOADING})
    second = services("second", 1)
    routing.set_state("second", 1, State.READY, service=second)
    assert routing.default() is second  # the first is still loading: skipped
    first = services("first", 2)
    routing.set_state("first", 2, State.READY, service=first)
    assert routing.default() is first


def test_default_with_every_model_failed_is_not_found(services):
    routing, _ = table_with(services, "m", {})
    routing.set_state("m", 1, State.FAILED, "bad graph")
    with pytest.raises(NotFound, match="no model loaded"):
        routing.default()


# -- the loaders' side ---------------------------------------------------------------------------------

def test_every_state_change_reaches_the_observer_with_old_and_new(services):
    changes = Changes()
    routing = RoutingTable(observer=changes)
    service = services("m", 1)
    routing.set_state("m", 1, State.LOADING)
    routing.set_state("m", 1, State.READY, service=service)
    routing.set_state("m", 2, State.LOADING)
    routing.set_state("m", 2, State.FAILED, "bad graph")
    assert changes.seen == [("m", 1, None, "LOADING"), ("m", 1, "LOADING", "READY"),
                            ("m", 2, None, "LOADING"), ("m", 2, "LOADING", "FAILED")]


def test_a_failed_version_keeps_no_service(services):
    routing, made = table_with(services, "m", {1: State.READY})
    routing.set_state("m", 1, State.FAILED, "its files changed and it no longer loads")
    assert routing.versions("m")[1].service is None


async def test_retire_closes_the_service_and_forgets_the_version(services):
    changes = Changes()
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY}, observer=changes)
    made[1].start()
    changes.seen.clear()
    await routing.retire("m", 1)
    assert changes.seen == [("m", 1, "READY", "UNLOADING"), ("m", 1, "UNLOADING", None)]
    assert set(routing.versions("m")) == {2} and routing.get("m") is made[2]
    with pytest.raises(NotFound, match="no version 1 available"):
        routing.get("m", 1)
    with pytest.raises(Unavailable, match="unloading"):  # its batcher is closed: nothing more is admitted
        made[1].admit()
    made[2].admit()  # the other version still takes requests


async def test_retiring_the_last_version_forgets_the_model_unless_it_has_labels(services):
    routing, made = table_with(services, "m", {1: State.READY})
    routing.set_state("n", 1, State.READY, service=services("n", 1))
    routing.set_labels("n", {"stable": 1})
    await routing.retire("m", 1)
    await routing.retire("n", 1)
    assert not routing.known("m")
    assert routing.known("n") and routing.versions("n") == {}
    with pytest.raises(NotFound, match="unknown model 'm'"):
        routing.get("m")
    routing.set_labels("n", {})
    routing.forget_model("n")
    assert not routing.known("n")


async def test_retiring_a_failed_version_just_forgets_it(services):
    changes = Changes()
    routing, made = table_with(services, "m", {1: State.READY}, observer=changes)
    routing.set_state("m", 2, State.FAILED, "bad graph")
    changes.seen.clear()
    await routing.retire("m", 2)
    assert changes.seen == [("m", 2, "FAILED", None)]
    assert set(routing.versions("m")) == {1}
    made[1].admit()


async def test_retiring_a_version_that_is_not_there_does_nothing(services):
    changes = Changes()
    routing, made = table_with(services, "m", {1: State.READY}, observer=changes)
    changes.seen.clear()
    await routing.retire("m", 9)
    await routing.retire("other", 1)
    assert changes.seen == [] and set(routing.versions("m")) == {1}


def test_forget_model_keeps_a_model_that_still_has_versions(services):
    routing, made = table_with(services, "m", {1: State.READY})
    routing.forget_model("m")
    assert routing.get("m") is made[1]


def test_roll_back_takes_a_version_out_of_routing_keeps_its_reason_and_hands_back_its_service(services):
    changes = Changes()
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY}, observer=changes)
    changes.seen.clear()
    service = routing.roll_back("m", 2, "rolled back: top-1 agreement 0.5 under min_agreement 0.97")
    assert service is made[2]
    service.admit()  # not closed by the table: the caller closes it (its queued requests are answered)
    assert changes.seen == [("m", 2, "READY", "ROLLED_BACK")]
    assert routing.get("m") is made[1]
    assert {"name": "m", "version": "2", "state": "ROLLED_BACK",
            "reason": "rolled back: top-1 agreement 0.5 under min_agreement 0.97"} in routing.index()
    assert routing.services() == [made[1]]


def test_a_rolled_back_version_named_by_number_is_not_found_with_its_reason(services):
    routing, made = table_with(services, "m", {1: State.READY, 2: State.READY})
    routing.roll_back("m", 2, "rolled back: too slow")
    with pytest.raises(NotFound, match="too slow"):
        routing.get("m", 2)
