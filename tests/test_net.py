"""Downloads fail after one attempt when the network is unreachable (#16): the offline switches,
one connect per host and process, no library retry loops. No test touches the network: the
connector (``tlbench.net._connect``) and the download calls are replaced."""

from __future__ import annotations

import time

import pytest
import torch

from tlbench import net
from tlbench.config import ModelConfig
from tlbench.errors import TlbenchError
from tlbench.models import weights
from tlbench.models.backbones import build_backbone

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",
              "NO_PROXY", "no_proxy")


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Downloads switched on (no offline variable, no proxy), empty caches, nothing learnt about
    the network; every connect and every download call is recorded, and fails unless a test
    says otherwise."""
    for var in (*net.OFFLINE_VARS, *PROXY_VARS):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    net.forget()
    calls: dict[str, list] = {"connect": [], "torchvision": [], "hf": []}

    def no_connect(host, port, timeout):
        calls["connect"].append((host, port))
        raise OSError("Network is unreachable")

    def tv_download(self, *a, **k):
        calls["torchvision"].append(self.url)
        raise AssertionError("a torchvision download was attempted")

    def hf_download(repo, fname, **k):
        calls["hf"].append(fname)
        raise AssertionError("a Hugging Face download was attempted")

    import huggingface_hub
    import torchvision.models._api as tv_api

    monkeypatch.setattr(net, "_connect", no_connect)
    monkeypatch.setattr(tv_api.WeightsEnum, "get_state_dict", tv_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_download)
    yield calls
    net.forget()


def test_no_network_fails_at_once_with_one_connect_per_host(online):
    """Cache misses with the network down: the clear message (what was looked for, the fix)
    after one connect per host; no download call, and a second miss does not connect again."""
    for _ in range(2):
        with pytest.raises(TlbenchError, match=r"network is unreachable.*resnet18-f37072fd\.pth.*"
                                               r"tlbench download model=resnet18"):
            build_backbone(ModelConfig(name="resnet18", pretrained=True))
        with pytest.raises(TlbenchError, match=r"network is unreachable.*models--timm--deit_tiny.*"
                                               r"tlbench download model=deit_tiny"):
            build_backbone(ModelConfig(name="deit_tiny", pretrained=True))
    assert sorted(online["connect"]) == [("download.pytorch.org", 443), ("huggingface.co", 443)]
    assert online["torchvision"] == [] and online["hf"] == []


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TLBENCH_OFFLINE"])
def test_offline_switches_skip_the_network(online, monkeypatch, var):
    monkeypatch.setenv(var, "1")
    assert net.is_offline() and weights.is_offline()
    with pytest.raises(TlbenchError, match=rf"downloads are off \({var} is set\): looked for .*resnet18"):
        build_backbone(ModelConfig(name="resnet18", pretrained=True))
    with pytest.raises(TlbenchError, match=rf"downloads are off \({var} is set\)"):
        build_backbone(ModelConfig(name="deit_tiny", pretrained=True))
    assert online == {"connect": [], "torchvision": [], "hf": []}


def test_a_failed_connection_is_not_retried(online, monkeypatch):
    """The host answers the check, but the download itself cannot connect: one call (not one
    per candidate file name), then later misses fail at once without connecting again."""
    import huggingface_hub

    class ConnectError(Exception):  # httpx's name; huggingface_hub wraps it
        pass

    def hf_download(repo, fname, **k):
        online["hf"].append(fname)
        try:
            raise ConnectError("[Errno 101] Network is unreachable")
        except ConnectError as e:
            raise RuntimeError("An error happened while trying to locate the file on the Hub") from e

    monkeypatch.setattr(net, "_connect", lambda host, port, timeout: online["connect"].append(host))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_download)
    with pytest.raises(TlbenchError, match="downloading them failed"):
        build_backbone(ModelConfig(name="deit_tiny", pretrained=True))
    assert online["hf"] == ["model.safetensors"] and online["connect"] == ["huggingface.co"]
    with pytest.raises(TlbenchError, match=r"network is unreachable \(ConnectError"):
        build_backbone(ModelConfig(name="deit_tiny", pretrained=True))
    assert online["hf"] == ["model.safetensors"] and online["connect"] == ["huggingface.co"]


def test_a_file_missing_in_the_repo_tries_the_other_name(online, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2)}, path)

    def hf_download(repo, fname, **k):
        online["hf"].append(fname)
        if fname == "model.safetensors":
            raise EntryNotFoundError(f"{fname} is not in {repo}")
        return str(path)

    monkeypatch.setattr(net, "_connect", lambda host, port, timeout: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_download)
    sd, source = weights.timm_state_dict({"architecture": "x", "hf_hub_id": "org/x"}, "x")
    assert online["hf"] == ["model.safetensors", "pytorch_model.bin"]
    assert torch.equal(sd["w"], torch.ones(2)) and source == f"timm org/x from {path}"


def test_a_slow_network_check_is_bounded(online, monkeypatch):
    """A connect (or DNS lookup) that hangs holds the caller for the timeout only."""
    monkeypatch.setattr(net, "CONNECT_TIMEOUT_S", 0.1)
    monkeypatch.setattr(net, "_connect", lambda host, port, timeout: time.sleep(5))
    t0 = time.monotonic()
    why = net.unreachable("https://huggingface.co")
    assert time.monotonic() - t0 < 2
    assert why is not None and "no answer within" in why


def test_the_check_goes_to_the_proxy(online, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert net._target("https://huggingface.co/timm/x") == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert net._target("https://huggingface.co/timm/x") == ("huggingface.co", 443)
    assert net._target("http://example.org:8080/a") == ("example.org", 8080)


@pytest.mark.parametrize("kind", ["cifar10", "emnist"])
def test_dataset_download_with_the_network_down_fails_at_once(online, monkeypatch, tmp_path, kind):
    from tlbench.config import DatasetConfig
    from tlbench.data import cifar10, emnist

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive",
                        lambda *a, **k: online["torchvision"].append(a))
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive",
                        lambda *a, **k: online["torchvision"].append(a))
    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive",
                        lambda *a, **k: online["torchvision"].append(a))
    module = {"cifar10": cifar10, "emnist": emnist}[kind]
    cfg = DatasetConfig(name=kind, root=str(tmp_path / kind), download=True)
    for _ in range(2):
        with pytest.raises(TlbenchError, match=r"could not fetch .*network is unreachable.*by hand"):
            module.load(cfg)
    assert len(online["connect"]) == 1 and online["torchvision"] == []
