"""`epp sim --data-parallel-size`: replicas grouped into data-parallel pods (the e2e test
tests/e2e/test_data_parallel_e2e.py drives the routing)."""

import pytest

from simulator.cli import build_parser, configs_from_args
from simulator.data_parallel import wire
from simulator.server import SimConfig, SimServer


@pytest.mark.parametrize("argv", [["--replicas", "3", "--data-parallel-size", "2"],
                                  ["--replicas", "2", "--data-parallel-size", "0"]])
def test_the_size_must_divide_the_replicas(argv):
    with pytest.raises(ValueError, match="--data-parallel-size must be >= 1 and divide --replicas"):
        configs_from_args(build_parser().parse_args(argv))


def test_each_group_is_one_pod_whose_first_server_knows_its_ranks():
    servers = [SimServer(SimConfig(port=9000 + i)) for i in range(4)]
    wire(servers, 2)
    assert list(servers[0].ranks) == ["127.0.0.1:9000", "127.0.0.1:9001"]
    assert list(servers[2].ranks) == ["127.0.0.1:9002", "127.0.0.1:9003"]
    assert servers[1].ranks == {} and servers[3].ranks == {}
