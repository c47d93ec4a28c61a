"""Property-based requests from the served OpenAPI document (schemathesis): no 5xx, ever."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance


def test_no_request_the_document_allows_gets_a_server_error(start_worker):
    # Small bounds keep each generated request cheap on the CPU; what exceeds them must be 422.
    worker = start_worker(max_image_side=128, max_batch_size=4, max_queue_images=64)
    schema = schemathesis.openapi.from_url(f"{worker.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} >= {"/v1/images/generations", "/readyz", "/metrics"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exercise(case):
            # Every check schemathesis has (no 5xx, documented statuses, headers, content types)
            # but one: "schema-valid data is accepted". Some limits are not in the schema on
            # purpose: sides that are multiples of the model's VAE factor, --max-image-side,
            # n within the queue; those answer 422 naming the field, which is the contract.
            case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

        exercise()
