"""hub.download and scripts/download.py, with the hub replaced by stand-ins (tests never reach the network)."""
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

import download
import hub
from conftest import save_tiny_hf, tiny_hf_config


def _error(cls, message):
    """An instance of a hub error class without the HTTP response object its constructor wants
    (whose type differs between huggingface_hub versions)."""
    return type(cls.__name__, (cls,), {"__init__": lambda self, m: Exception.__init__(self, m)})(message)


@pytest.fixture
def fake_hub(monkeypatch):
    """Records snapshot_download calls; `files` and `error` steer what the fake hub does."""
    state = {"files": [], "error": None, "calls": []}

    class FakeApi:
        def __init__(self, token=None):
            state["token"] = token

        def list_repo_files(self, repo_id):
            if state["error"]:
                raise state["error"]
            return state["files"]

    def fake_snapshot(repo_id, local_dir, token, allow_patterns, ignore_patterns):
        state["calls"].append((repo_id, allow_patterns, ignore_patterns))
        save_tiny_hf(local_dir, tiny_hf_config())
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    return state


def test_downloads_and_converts(fake_hub, tmp_path):
    fake_hub["files"] = ["config.json", "model.safetensors", "pytorch_model.bin", "original/consolidated.00.pth"]
    download.main(["--repo_id", "org/model", "--output_dir", str(tmp_path / "m"), "--hf_token", "tok"])
    (repo_id, allow, ignore), = fake_hub["calls"]
    assert repo_id == "org/model" and fake_hub["token"] == "tok"
    assert "*.bin" in ignore and "original/*" in ignore  # safetensors present: no duplicate .bin
    assert (tmp_path / "m" / "checkpoint.safetensors").is_file()


def test_bin_only_repo_fetches_bin():
    _, ignore = hub.weight_patterns(["config.json", "pytorch_model.bin"])
    assert "*.bin" not in ignore


@pytest.mark.parametrize("error, message", [
    (_error(GatedRepoError, "gated"), "is gated: accept its license"),
    (_error(RepositoryNotFoundError, "nope"), "was not found on the Hugging Face hub"),
    (_error(LocalEntryNotFoundError, "offline"), "could not reach the Hugging Face hub"),
])
def test_hub_errors_become_clear_messages(fake_hub, tmp_path, capsys, error, message):
    fake_hub["error"] = error
    with pytest.raises(SystemExit) as e:
        download.main(["--repo_id", "org/model", "--output_dir", str(tmp_path / "m")])
    assert message in str(e.value)
    assert not (tmp_path / "m").exists()
