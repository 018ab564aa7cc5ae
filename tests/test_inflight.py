"""In-flight accounting: a charge adds the request's estimate and takes back exactly that, once."""

from epp.framework import Endpoint, InferenceRequest
from epp.requestcontrol.inflight import InFlightCharge, estimated_tokens


def _request(prompt: str, max_tokens: int | None) -> InferenceRequest:
    return InferenceRequest(request_id="r", target_model="m", incoming_model="m", kind="completions",
                            prompt_text=prompt, headers={}, max_tokens=max_tokens)


def test_estimate_is_prompt_chars_over_four_plus_max_tokens():
    assert estimated_tokens(_request("x" * 400, 50)) == 150
    assert estimated_tokens(_request("", None)) == 1


def test_charge_adds_and_releases_exactly_once():
    ep = Endpoint(name="a", address="10.0.0.1", port=8000)
    ep.in_flight, ep.in_flight_tokens = 3, 1000  # other requests' load stays untouched
    charge = InFlightCharge.add(ep, _request("x" * 40, 7))
    assert (ep.in_flight, ep.in_flight_tokens, charge.tokens) == (4, 1017, 17)
    charge.release()
    charge.release()
    assert (ep.in_flight, ep.in_flight_tokens) == (3, 1000)


def test_two_charges_on_one_endpoint_release_independently():
    ep = Endpoint(name="a", address="10.0.0.1", port=8000)
    first = InFlightCharge.add(ep, _request("x" * 4, 10))
    second = InFlightCharge.add(ep, _request("x" * 4, 100))
    first.release()
    assert (ep.in_flight, ep.in_flight_tokens) == (1, 101)
    second.release()
    assert (ep.in_flight, ep.in_flight_tokens) == (0, 0)
