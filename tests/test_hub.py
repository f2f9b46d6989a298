"""hub.find_checkpoint: what a user names as the model -> a local checkpoint (the hub is faked: no network)."""
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

import hub
from checkpoint import resolve_checkpoint_path
from conftest import save_tiny_hf, tiny_hf_config


def _error(cls, message):
    """A hub error without the HTTP response its constructor wants (as in test_download.py)."""
    return type(cls.__name__, (cls,), {"__init__": lambda self, m: Exception.__init__(self, m)})(message)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """hub.CHECKPOINTS in tmp_path, the working directory elsewhere, so a repo id is no local path."""
    root = tmp_path / "checkpoints"
    monkeypatch.setattr(hub, "CHECKPOINTS", root)
    monkeypatch.chdir(tmp_path)
    return root


@pytest.fixture
def downloads(monkeypatch):
    """hub.download replaced by one that writes a tiny Hugging Face checkpoint; records its calls."""
    calls = []

    def fake_download(repo_id, output_dir, token=None):
        calls.append((repo_id, Path(output_dir), token))
        save_tiny_hf(Path(output_dir), tiny_hf_config())
        return output_dir
    monkeypatch.setattr(hub, "download", fake_download)
    return calls


def test_an_existing_path_is_returned_as_is(tmp_path, downloads):
    folder = tmp_path / "org" / "model"  # looks like a repo id too: the local folder wins
    folder.mkdir(parents=True)
    (folder / "checkpoint.safetensors").write_bytes(b"")
    assert hub.find_checkpoint(folder) == folder
    assert hub.find_checkpoint(str(folder / "checkpoint.safetensors")) == folder / "checkpoint.safetensors"
    assert downloads == []


def test_a_repo_id_is_downloaded_and_converted_once(checkpoints, downloads, capsys):
    path = hub.find_checkpoint("org/tiny-model", token="tok")
    assert path == checkpoints / "org" / "tiny-model"
    assert downloads == [("org/tiny-model", path, "tok")]
    assert resolve_checkpoint_path(path) == path / "checkpoint.safetensors"
    assert "downloading it from the Hugging Face hub" in capsys.readouterr().err
    assert hub.find_checkpoint("org/tiny-model") == path  # converted: not again
    assert hub.find_checkpoint("org/tiny-model", world_size=2) == path
    assert len(downloads) == 1


@pytest.mark.parametrize("error", [
    _error(LocalEntryNotFoundError, "offline"),  # what hub.download turns into a ConnectionError
    type("ConnectError", (Exception,), {"__module__": "httpx2"})("Name or service not known"),  # let through
])
def test_an_unreachable_hub_is_said_so(checkpoints, monkeypatch, error):
    class OfflineApi:
        def __init__(self, token=None):
            pass

        def list_repo_files(self, repo_id):
            raise error
    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    with pytest.raises(ConnectionError, match=r"cannot download org/model: the Hugging Face hub cannot be reached") \
            as e:
        hub.find_checkpoint("org/model")
    assert "--checkpoint_path" in str(e.value)
    assert not (checkpoints / "org").exists()


def test_a_repo_missing_on_the_hub_says_there_is_no_local_path_either(checkpoints, monkeypatch):
    class Api:
        def __init__(self, token=None):
            pass

        def list_repo_files(self, repo_id):
            raise _error(RepositoryNotFoundError, "nope")
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(FileNotFoundError, match="not found on the Hugging Face hub.*nor is there a local file or "
                                                "folder org/typo"):
        hub.find_checkpoint("org/typo")


def test_a_failed_download_is_no_checkpoint_and_is_retried(checkpoints, downloads, monkeypatch):
    working = hub.download

    def breaks_midway(repo_id, output_dir, token=None):
        Path(output_dir).mkdir(parents=True)
        (Path(output_dir) / "config.json").write_text("{}")
        raise ConnectionError("connection reset")
    monkeypatch.setattr(hub, "download", breaks_midway)
    with pytest.raises(ConnectionError, match="org/model"):
        hub.find_checkpoint("org/model")
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint_path(checkpoints / "org" / "model")
    monkeypatch.setattr(hub, "download", working)
    assert hub.find_checkpoint("org/model") == checkpoints / "org" / "model"
    assert len(downloads) == 1


def test_tensor_parallel_ranks_do_not_download(checkpoints, downloads):
    with pytest.raises(FileNotFoundError, match=r"run `python scripts/download.py --repo_id org/model` once"):
        hub.find_checkpoint("org/model", world_size=2)
    assert downloads == [] and not checkpoints.exists()


def test_the_default_model_is_prepared_on_first_use(tmp_path, monkeypatch, capsys):
    target = tmp_path / "checkpoints" / "SmolLM2-135M-Instruct"
    prepared = []

    def stand_in(out_dir, source=None):
        prepared.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "checkpoint.safetensors").write_bytes(b"")
        return Path(out_dir)
    monkeypatch.setattr(hub, "DEFAULT_CHECKPOINT", target)
    monkeypatch.setattr(hub, "prepare_default_model", stand_in)
    with pytest.raises(FileNotFoundError, match=r"run `python scripts/prepare_smollm2.py` once, then torchrun"):
        hub.find_checkpoint(target, world_size=2)  # ranks must not race to write one folder
    assert prepared == []
    assert hub.find_checkpoint(target) == target
    assert "not prepared yet; preparing it" in capsys.readouterr().err
    assert hub.find_checkpoint(target, world_size=2) == target  # prepared: not again
    assert prepared == [target]


@pytest.mark.parametrize("spec", ["missing", "a/b/c", "./org/model", "/org/model", "org/..", "org/mo del",
                                  "org/model.safetensors/x"])
def test_anything_else_is_returned_unchanged(checkpoints, downloads, spec):
    assert hub.find_checkpoint(spec) == Path(spec)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        resolve_checkpoint_path(hub.find_checkpoint(spec))
    assert downloads == []


def test_is_repo_id():
    assert hub.is_repo_id("meta-llama/Llama-3.2-1B-Instruct") and hub.is_repo_id("facebook/layerskip-llama2-7B")
    assert not any(hub.is_repo_id(s) for s in ("llama", "a/b/c", ".a/b", "/a/b", "a/.hidden", "a/", "/a"))
