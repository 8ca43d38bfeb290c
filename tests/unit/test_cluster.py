"""Cluster descriptions: presets + size, cluster files, overrides, one-line errors."""

import pytest

from spindle.costs.cluster import GIB, ClusterError, load_cluster
from spindle.costs.hardware import load_hardware
from spindle.planner.simulator import links_for_cluster


def test_presets_by_nodes_and_devices():
    a800 = load_cluster("a800", nodes=4)
    hw = load_hardware("a800")
    assert (a800.num_devices, a800.devices_per_node, a800.num_nodes) == (32, 8, 4)
    assert a800.memory_bytes == hw.memory_bytes == 80 * GIB
    assert a800.hardware.intra_node_bandwidth == hw.intra_node_bandwidth
    assert a800.precision == "bf16-mixed"
    h100 = load_cluster("h100", num_devices=16)
    assert h100.num_nodes == 2 and h100.hardware.intra_node_bandwidth > hw.intra_node_bandwidth
    cpu = load_cluster("cpu", num_devices=2)
    assert cpu.precision == "fp32" and cpu.memory_model().activation_bytes == 4
    assert "cpu" in cpu.describe()
    # fewer devices than a node: one node of that many; more: a partial last node
    assert load_cluster("a800", num_devices=2).devices_per_node == 2
    part = load_cluster("a800", num_devices=12)
    assert (part.num_nodes, part.node(11)) == (2, 1)
    assert load_cluster("a800", num_devices=8, devices_per_node=4).num_nodes == 2
    assert load_cluster("a800", num_devices=8, device_memory_gib=40).memory_bytes == 40 * GIB


def test_links_follow_the_cluster():
    c = load_cluster("h100", nodes=2)
    links = links_for_cluster(c)
    assert links.devices_per_node == c.devices_per_node
    assert links.intra_node_bw == c.hardware.intra_node_bandwidth
    assert links.inter_node_bw == c.hardware.inter_node_bandwidth
    assert links.inter_node_latency_s == c.hardware.inter_node_latency_s
    assert links.activation_bytes == 2 and links.grad_bytes == c.hardware.grad_bytes
    devices = (0, 7, 8, 15)
    assert [links.node(d) for d in devices] == [c.node(d) for d in devices] == [0, 0, 1, 1]


def test_cluster_file_with_overrides(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("hardware: a800\nnodes: 2\ndevice_memory_gib: 40\n"
                 "inter_node_bandwidth_gb_s: 25\ninter_node_latency_us: 50\nprecision: fp32\n")
    c = load_cluster(f)
    assert c.num_devices == 16 and c.memory_bytes == 40 * GIB
    assert c.hardware.inter_node_bandwidth == 25e9
    assert c.hardware.inter_node_latency_s == pytest.approx(50e-6)
    assert c.precision == "fp32" and c.source == str(f)
    # the command line's size wins over the file's
    assert load_cluster(f, num_devices=4).num_devices == 4
    # a hardware file next to the cluster file, by relative path
    (tmp_path / "gpu.yaml").write_text((load_hardware_text()))
    g = tmp_path / "c2.yaml"
    g.write_text("hardware: gpu.yaml\nnum_devices: 8\n")
    assert load_cluster(g).hardware.name == "gpu"


def load_hardware_text() -> str:
    import yaml

    from spindle.costs.hardware import HARDWARE_FILE

    return yaml.safe_dump(yaml.safe_load(HARDWARE_FILE.read_text())["a800"])


@pytest.mark.parametrize("body, needle", [
    ("hardware: a800\nnodes: -1\n", "nodes"),
    ("hardware: a800\nnodes: 2\ncolour: red\n", "colour"),
    ("hardware: a900\nnodes: 2\n", "a900"),
    ("hardware: a800\nnodes: 2\nnum_devices: 12\n", "num_devices 12"),
    ("hardware: a800\nnodes: 2\nprecision: fp8\n", "precision"),
    ("hardware: a800\nnodes: [2\n", "malformed YAML"),
    ("hardware: a800\nnodes: 1\ndevice_memory_gib: 0\n", "device_memory_gib"),
])
def test_bad_cluster_files_fail_in_one_line(tmp_path, body, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(ClusterError) as err:
        load_cluster(f)
    msg = str(err.value)
    assert "\n" not in msg and needle in msg and str(f) in msg


def test_bad_arguments():
    with pytest.raises(ClusterError, match="no shipped preset"):
        load_cluster("a900", num_devices=8)
    with pytest.raises(ClusterError, match="num_devices must be >= 1"):
        load_cluster("a800", num_devices=0)
    with pytest.raises(ClusterError, match="device_memory_gib"):
        load_cluster("a800", num_devices=8, device_memory_gib=-1)
