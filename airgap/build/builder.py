"""`airgap build`: fetch what a spec names, pin it, and pack one signed bundle (connected host only)."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import airgap
from airgap.build.sources.selfwheel import build_self_wheel, runtime_requirements
from airgap.build.sources.wheels import ResolvedWheel, resolve_wheels
from airgap.build.spec import ModelSpec, Spec
from airgap.bundle.container import LateFile, prepare_entry, scratch_dir
from airgap.bundle.drops import load_roots, pack, read_base, root_payload
from airgap.errors import MissingDependencyError, ResolveError, SpecError
from airgap.format.manifest import DraftFile, Manifest, ModelEntry, PythonPackage, check_gguf
from airgap.hardware.facts import HostFacts
from airgap.progress import byte_progress
from airgap.streams.pipeline import digest_file
from airgap.trust.roots import Root
from airgap.trust.signing import PrivateKey, key_id, sign

if TYPE_CHECKING:
    from airgap.build.sources.backend import BuiltBackend
    from airgap.build.sources.engine import EngineFile
    from airgap.build.sources.wheels import Pin, Pip

BOOTSTRAP_REQUIREMENTS = "bootstrap-requirements.txt"


@dataclass(frozen=True)
class BuildOptions:
    out_dir: Path
    created: datetime | None = None
    upgrade: bool = False
    progress: bool = True
    hub_endpoint: str | None = None
    hub_cache: Path | None = None
    wheel_cache: Path | None = None
    engine_cache: Path | None = None  # where compiled llama-server builds are kept (~/.cache/airgap/engine)
    convert_cache: Path | None = None  # where converted models are kept (~/.cache/airgap/converted)
    base: Path | None = None  # build an update drop on top of this bundle
    roots: tuple[Path, ...] = ()  # root files (one unbroken chain) the bundle carries
    expires_days: int | None = None  # overrides the spec's bundle.expires_days
    target: HostFacts | None = None  # build for the host of this probe (`build --target`)
    say: Callable[[str], object] | None = None  # where the choices made for the target are explained


def creation_time(explicit: datetime | None = None) -> datetime:
    """SOURCE_DATE_EPOCH makes builds reproducible; otherwise the bundle is stamped now."""
    if explicit is not None:
        return explicit.astimezone(UTC).replace(microsecond=0)
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), UTC)
        except ValueError as exc:
            raise SpecError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, found {epoch!r}") from exc
    return datetime.now(UTC).replace(microsecond=0)


def bundle_filename(name: str, version: str) -> str:
    return f"{name}-{version}.airgap"


def build_bundle(spec: Spec, signers: Sequence[PrivateKey], options: BuildOptions) -> Path:
    """Build `<out_dir>/<name>-<version>.airgap` from a spec, signed by every key in `signers`."""
    _check_build_extra(spec)
    created = creation_time(options.created)
    target: dict[str, object] | None = None
    cuda = spec.cuda is True
    vulkan = spec.vulkan is True
    if options.target is not None:
        from airgap.build.fit import HubReader, size_for_target

        targeted = size_for_target(spec, options.target, HubReader(options.hub_endpoint), options.say,
                                   cuda_packed=_can_pack_cuda(spec), vulkan_packed=_can_pack_vulkan(spec))
        spec, target = targeted.spec, targeted.record
        cuda = cuda or targeted.engine.engine == "cuda"
        vulkan = vulkan or targeted.engine.engine == "vulkan"
    if vulkan:
        _check_vulkan_toolchain(spec)  # before anything is downloaded
    _check_no_open_choice(spec)
    base = read_base(options.base) if options.base is not None else None
    roots = load_roots(options.roots)
    _check_release_keys(signers, roots)
    with scratch_dir(options.out_dir) as tmp:
        work = Path(tmp)
        wheels = _collect_wheels(spec, options, work / "wheels")
        llama = _llama_sdist(spec, wheels, options)
        engine = _collect_engine(spec, wheels, llama, options, cuda=cuda, vulkan=vulkan)
        models, model_files, model_licenses = _collect_models(spec, options, llama)
        bootstrap = _bootstrap_requirements(spec, wheels, work)
        # what an operator needs to install airgap itself stays raw: tar, sha256sum and pip suffice, no zstd
        raw_paths = {bootstrap.entry.path, *(f"wheels/{w.filename}" for w in wheels if w.name in bootstrap.packages)}
        packed = work / "packed"
        packed.mkdir()
        payload = [prepare_entry(path, entry, packed, compress=entry.path not in raw_paths)
                   for path, entry in [*model_files, *wheels_payload(wheels), *engine,
                                       (bootstrap.path, bootstrap.entry)]]
        draft = Manifest(
            name=spec.name, version=spec.version, created=created,
            expires=created + timedelta(days=options.expires_days or spec.expires_days),
            tool_version=airgap.__version__,
            files=(), models=tuple(models),
            packages=tuple(PythonPackage(w.name, w.version, f"wheels/{w.filename}") for w in wheels),
            python={
                "requirements": list(spec.python.requirements),
                "python_version": spec.python.python_version or "",
                "platforms": list(spec.python.platforms),
                "bootstrap": BOOTSTRAP_REQUIREMENTS,
            },
            target=target,
        )
        out = options.out_dir / bundle_filename(spec.name, spec.version)
        carried = [*root_payload(roots, work), *payload]
        sbom = _sbom_file(draft, [p.entry for p in carried], wheels, model_licenses)
        total = sum(p.entry.stored_size for p in payload)
        with byte_progress(total, f"packing {out.name}", options.progress) as advance:
            pack(out, draft, carried, lambda data: [sign(data, k) for k in signers], base, advance, sbom)
    return out


def _check_build_extra(spec: Spec) -> None:
    """The core install verifies, installs and serves; reading GGUF files and the hub needs `airgap[build]`."""
    needed = {"gguf": "reading the models' GGUF metadata"} if spec.models else {}
    if any(model.repo is not None for model in spec.models):
        needed["huggingface_hub"] = "fetching models from the Hugging Face hub"
    converted = next((model for model in spec.models if model.quantize is not None), None)
    if converted is not None:
        from airgap.build.sources.convert import check_converter_installed

        check_converter_installed(converted.id)
    missing = [f"{module} (for {why})" for module, why in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingDependencyError(
            f"this spec needs {' and '.join(missing)}, which airgap's core install lacks; "
            "install the build extra on the connected host: pip install 'airgap[build]'")


# The SBOM's length is needed before the payload is hashed; hashes are fixed-width hex, so any 64 digits
# size it exactly. This is the one place a stand-in hash is used, and it never reaches a bundle.
_SBOM_SIZING_SHA256 = "0" * 64


def _sbom_file(
    draft: Manifest, files: Sequence[DraftFile], wheels: list[ResolvedWheel], model_licenses: dict[str, Any]
) -> LateFile:
    """The SBOM, written after every other file so that it lists their hashes; its size is known now."""
    from airgap.build.sources.sbom import SBOM_PATH, SbomFacts, render_sbom, wheel_license

    licenses = {f"wheels/{w.filename}": text for w in wheels if (text := wheel_license(w.path)) is not None}
    facts = SbomFacts(wheel_licenses=licenses, model_licenses=model_licenses)
    sized = tuple(f.hashed(f.sha256 or _SBOM_SIZING_SHA256) for f in files)
    size = len(render_sbom(replace(draft, files=sized), facts))
    entry = DraftFile(path=SBOM_PATH, size=size, kind="meta", storage="raw", stored_size=size,
                      source={"type": "generated"})
    return LateFile(entry, lambda entries: render_sbom(replace(draft, files=tuple(entries)), facts))


def _check_no_open_choice(spec: Spec) -> None:
    """`file = "auto"` or a glob picks one quantization for a target host; without one there is nothing to size."""
    for model in spec.models:
        if model.quantize == "auto":
            raise SpecError(f"model {model.id!r}: quantize = 'auto' picks the largest quantization that fits a target "
                            "host; pass --target PROBE.json (written by `airgap probe` on that host)")
        if len(model.files) == 1 and (model.files[0] == "auto" or any(c in model.files[0] for c in "*?[")):
            raise SpecError(f"model {model.id!r}: file = {model.files[0]!r} picks the largest quantization that fits a "
                            "target host; pass --target PROBE.json (written by `airgap probe` on that host)")


def _check_release_keys(signers: Sequence[PrivateKey], roots: Sequence[Root]) -> None:
    """A bundle carrying roots is signed by release keys of the newest one (co-signers may follow)."""
    if not roots:
        return
    allowed = set(roots[-1].release.keyids)
    for key in signers:
        if key_id(key.public_key()) not in allowed:
            raise SpecError(f"signing key {key_id(key.public_key())[:16]} is not a release key of root version "
                            f"{roots[-1].version}; its release keys are {', '.join(k[:16] for k in sorted(allowed))}")


@dataclass(frozen=True)
class FetchedFile:
    """One model file ready to pack: its local copy, its name in the bundle and where it came from."""

    local: Path
    name: str
    source: dict[str, str]


@dataclass(frozen=True)
class LlamaSdist:
    """The pinned llama-cpp-python sdist that llama-server, its tools and the converter all come from."""

    pin: Pin
    pip: Pip


def _collect_models(
    spec: Spec, options: BuildOptions, llama: LlamaSdist | None
) -> tuple[list[ModelEntry], list[tuple[Path, DraftFile]], dict[str, Any]]:
    models: list[ModelEntry] = []
    files: list[tuple[Path, DraftFile]] = []
    licenses: dict[str, Any] = {}
    for model in spec.models:
        fetched = _fetch_model(model, options, llama, spec.cpu_variants)
        card = _card_license(model, fetched[0].source, options) if fetched else None
        if card is not None:
            licenses[model.id] = card
        paths = []
        for file in fetched:
            path = f"models/{model.id}/{file.name}"
            files.append((file.local, DraftFile(path=path, size=0, kind="model", source=file.source)))
            paths.append(path)
        gguf_files = [file.local for file in fetched if file.name.endswith(".gguf")]
        metadata = _gguf_metadata(gguf_files[0]) if gguf_files else {}
        models.append(ModelEntry(id=model.id, files=tuple(paths), gguf=check_gguf(model.id, metadata),
                                 embedding=model.embedding))
    return models, files, licenses


def _card_license(model: ModelSpec, source: dict[str, str], options: BuildOptions) -> Any:
    """The licence the hub repository's card states at the pinned commit (None for local files or no card)."""
    if source.get("type") not in {"hub", "converted"}:
        return None
    from airgap.build.sources.hf import fetch_card_metadata
    from airgap.build.sources.sbom import ModelLicense

    card = fetch_card_metadata(source["repo"], source["commit"], cache_dir=options.hub_cache,
                               endpoint=options.hub_endpoint)
    value = card.get("license")
    if isinstance(value, list):
        value = " OR ".join(str(v) for v in value)
    if not isinstance(value, str) or not value.strip():
        return None
    name, link = card.get("license_name"), card.get("license_link")
    return ModelLicense(value.strip(), str(name) if name else None, str(link) if link else None)


def _gguf_metadata(path: Path) -> dict[str, object]:
    from airgap.build.sources.gguf_meta import read_gguf_metadata  # numpy-heavy: only when a GGUF is packed

    return dict(read_gguf_metadata(path))


def _fetch_model(
    model: ModelSpec, options: BuildOptions, llama: LlamaSdist | None, spec_variants: Sequence[str]
) -> list[FetchedFile]:
    if model.path is not None:
        return [FetchedFile(model.path, model.path.name, {"type": "local", "path": str(model.path)})]
    if model.quantize is not None:
        return [_convert_model(model, options, llama, spec_variants)]
    from airgap.build.sources.hf import fetch_hub_files

    assert model.repo is not None
    hub_files = fetch_hub_files(
        model.repo, model.revision, model.files or None, model.allow_patterns or None,
        cache_dir=options.hub_cache, endpoint=options.hub_endpoint, progress=options.progress,
    )
    return [FetchedFile(f.path, f.filename.replace("/", "-"), {"type": "hub", "repo": f.repo, "commit": f.commit,
                                                                "file": f.filename}) for f in hub_files]


def _convert_model(
    model: ModelSpec, options: BuildOptions, llama: LlamaSdist | None, spec_variants: Sequence[str]
) -> FetchedFile:
    """Fetch the repo's safetensors, config and tokenizer, and convert them with the pinned llama.cpp's tools."""
    from airgap.build.sources import convert
    from airgap.build.sources.engine import default_cache_dir, engine_for
    from airgap.build.sources.hf import fetch_hub_files, list_hub_files

    assert model.repo is not None and model.quantize is not None
    if llama is None:
        raise SpecError(f"model {model.id!r}: quantize converts with the llama.cpp of the llama-cpp-python sdist; "
                        "expected the requirements to build llama-cpp-python from source, found none built")
    commit, listing = list_hub_files(model.repo, model.revision, endpoint=options.hub_endpoint)
    names = convert.files_to_fetch(model.repo, commit, listing)
    hub_files = fetch_hub_files(model.repo, commit, names, None, cache_dir=options.hub_cache,
                                endpoint=options.hub_endpoint, progress=options.progress)
    sources = [convert.SourceFile(f.filename, f.path, f.sha256) for f in hub_files]
    engine = engine_for(llama.pin, llama.pip, cache_dir=options.engine_cache or default_cache_dir(),
                        variants=cpu_variants(spec_variants, options.target), progress=options.progress)
    tool = engine.quantize
    quantizer = convert.Quantizer(sdist_name=llama.pin.filename, sdist_sha256=llama.pin.sha256,
                                  fetch_sdist=lambda into: llama.pip.download_sdist(llama.pin, into),
                                  quantize=tool, quantize_sha256=digest_file(tool).sha256)
    done = convert.convert(sources, model_name=model.id, quantization=model.quantize, quantizer=quantizer,
                           cache_dir=options.convert_cache or convert.default_cache_dir(), progress=options.progress)
    versions = done.record.get("versions", {})
    assert isinstance(versions, dict)
    source = {
        "type": "converted", "repo": model.repo, "commit": commit,
        "files": " ".join(s.name for s in sources), "sources_sha256": convert.sources_digest(sources),
        "converter": str(done.record["converter"]), "sdist_sha256": llama.pin.sha256,
        "quantizer": str(done.record["quantizer"]), "quantize_sha256": quantizer.quantize_sha256,
        "quantization": model.quantize, "torch": str(versions.get("torch", "")),
        "transformers": str(versions.get("transformers", "")), "cache_key": done.cache_key,
    }
    return FetchedFile(done.path, done.path.name, source)


def _collect_wheels(spec: Spec, options: BuildOptions, dest: Path) -> list[ResolvedWheel]:
    # airgap itself is never resolved by name: an index could serve another project called "airgap"
    resolved = resolve_wheels(
        [*spec.python.requirements, *runtime_requirements()], dest=dest, find_links=spec.python.find_links,
        index_url=spec.python.index_url, python_version=spec.python.python_version,
        platforms=spec.python.platforms, lock_path=spec.lock_path, upgrade=options.upgrade,
        build_cache=options.wheel_cache, progress=options.progress,
    )
    if any(w.name == "airgap" for w in resolved):
        raise SpecError("the requirements pull in a package named 'airgap' from an index; airgap packs itself")
    own = build_self_wheel(dest)
    digest = digest_file(own)
    return [*resolved, ResolvedWheel(name="airgap", version=airgap.__version__, filename=own.name, path=own,
                                     size=digest.size, sha256=digest.sha256, source={"type": "self"})]


def _can_pack_cuda(spec: Spec) -> bool:
    """Whether this build can carry the CUDA backend: asked for, or llama-server is built and CUDA not refused."""
    if spec.cuda is not None:
        return spec.cuda
    names = {re.split(r"[\s\[<>=!~;@(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
             for r in spec.python.requirements}
    return spec.engine is not False and "llama-cpp-python" in names


def _can_pack_vulkan(spec: Spec) -> bool:
    """Whether a build for a target below the CUDA floor carries the Vulkan backend: unless the spec says no or
    asks for CUDA, whenever llama-server is built (then it needs a Vulkan toolchain on this host)."""
    if spec.vulkan is not None:
        return spec.vulkan
    return spec.cuda is not True and _can_pack_cuda(spec)


def _check_vulkan_toolchain(spec: Spec) -> None:
    from airgap.build.sources.vulkan import find_toolchain

    try:
        find_toolchain(os.environ)
    except ResolveError as exc:
        asked = "engine.vulkan = true" if spec.vulkan else "the target's Vulkan engine (engine.vulkan = false: CPU)"
        raise ResolveError(f"{spec.path}: {asked}: {exc.message}") from exc


def _llama_sdist(spec: Spec, wheels: list[ResolvedWheel], options: BuildOptions) -> LlamaSdist | None:
    """The sdist llama-cpp-python was built from, when the requirements build it from source."""
    llama = next((w for w in wheels if w.name == "llama-cpp-python"), None)
    if llama is None or llama.source.get("type") != "built":
        return None
    from airgap.build.sources.wheels import Pin, Pip

    return LlamaSdist(
        pin=Pin(name=llama.name, version=llama.version, filename=llama.source["from"],
                sha256=llama.source["sdist_sha256"], url=llama.source.get("sdist_url", "")),
        pip=Pip(find_links=spec.python.find_links, index_url=spec.python.index_url, progress=options.progress),
    )


def cpu_variants(spec_variants: Sequence[str], target: HostFacts | None) -> tuple[str, ...]:
    """The ggml CPU variants llama-server is built with: the spec's, else the target's best and x64, else all."""
    from airgap.build.sources.engine import CPU_VARIANTS, chosen_variants
    from airgap.hardware.target import cpu_variants_for

    if spec_variants:
        return chosen_variants(spec_variants)
    fitting = cpu_variants_for(target) if target is not None else None
    return CPU_VARIANTS if fitting is None else fitting


def _collect_engine(
    spec: Spec, wheels: list[ResolvedWheel], llama: LlamaSdist | None, options: BuildOptions, *, cuda: bool,
    vulkan: bool = False,
) -> list[tuple[Path, DraftFile]]:
    """llama-server from the same sdist llama-cpp-python was built from, when the spec pulls that in; with
    `cuda` or `vulkan`, that GPU backend of the same sdist beside it."""
    if spec.engine is False:
        return []
    if llama is None:
        if spec.engine or cuda or vulkan:
            wheel = next((w for w in wheels if w.name == "llama-cpp-python"), None)
            found = "no llama-cpp-python" if wheel is None else f"llama-cpp-python from {wheel.source.get('type')}"
            asked = ("engine.llama_server = true" if spec.engine else "engine.cuda = true" if spec.cuda
                     else "engine.vulkan = true" if spec.vulkan else
                     "the target's CUDA engine" if cuda else "the target's Vulkan engine")
            raise SpecError(f"{spec.path}: {asked} builds llama-server from the "
                            f"llama-cpp-python sdist; expected the requirements to build it from source, found {found}")
        return []
    from airgap.build.sources.engine import CPU_VARIANTS, default_cache_dir, engine_for, manifest_source

    variants = cpu_variants(spec.cpu_variants, options.target)
    # all of them only when the target's flags are unknown: then there was no choice to explain
    if options.target is not None and not spec.cpu_variants and options.say is not None and \
            variants != CPU_VARIANTS:
        options.say(f"llama-server: ggml CPU variants {', '.join(variants)} (what the target's CPU runs best, "
                    "and x64, which any x86-64 CPU runs)")
    built = engine_for(llama.pin, llama.pip, cache_dir=options.engine_cache or default_cache_dir(),
                       variants=variants, progress=options.progress)
    source = manifest_source(built)
    files = [(f.path, DraftFile(path=f"engine/{f.name}", size=f.size, sha256=f.sha256, kind="engine",
                                source=source)) for f in built.files]
    if cuda:
        files += _collect_cuda(llama.pin, llama.pip, built.files, options, spec.cuda_architectures)
    if vulkan:
        files += _collect_vulkan(llama.pin, llama.pip, built.files, options)
    return files


def _collect_cuda(
    sdist: Pin, pip: Pip, engine_files: Sequence[EngineFile], options: BuildOptions, architectures: Sequence[str]
) -> list[tuple[Path, DraftFile]]:
    """libggml-cuda.so and the CUDA runtime, for the spec's architectures or the target's GPUs."""
    from airgap.build.sources import cuda
    from airgap.build.sources.engine import default_cache_dir

    chosen = cuda.architectures_for(options.target, architectures)
    if options.progress:
        print(f"CUDA backend for compute capabilities {', '.join(chosen)}", file=sys.stderr)
    built = cuda.cuda_for(sdist, pip, architectures=chosen, cache_dir=options.engine_cache or default_cache_dir(),
                          progress=options.progress)
    return _backend_entries(built, engine_files, cuda.DRIVER_LIBRARIES, cuda.manifest_source(built), "CUDA")


def _collect_vulkan(
    sdist: Pin, pip: Pip, engine_files: Sequence[EngineFile], options: BuildOptions
) -> list[tuple[Path, DraftFile]]:
    """libggml-vulkan.so and the Vulkan loader, beside llama-server."""
    from airgap.build.sources import vulkan
    from airgap.build.sources.engine import default_cache_dir

    built = vulkan.vulkan_for(sdist, pip, cache_dir=options.engine_cache or default_cache_dir(),
                              progress=options.progress)
    return _backend_entries(built, engine_files, (), vulkan.manifest_source(built), "Vulkan")


def _backend_entries(built: BuiltBackend, engine_files: Sequence[EngineFile], host_provided: Iterable[str],
                     source: dict[str, str], name: str) -> list[tuple[Path, DraftFile]]:
    """A GPU backend's files as engine entries, once the engine is known to carry what they need from it."""
    from airgap.build.sources.backend import engine_needs

    missing = sorted(engine_needs(built, host_provided) - {f.name for f in engine_files})
    if missing:
        raise ResolveError(f"expected the llama-server engine to carry {', '.join(missing)} for the {name} "
                           "backend, found none")
    return [(f.path, DraftFile(path=f"engine/{f.name}", size=f.size, sha256=f.sha256, kind="engine",
                               source=source)) for f in built.files]


def wheels_payload(wheels: list[ResolvedWheel]) -> list[tuple[Path, DraftFile]]:
    return [(w.path, DraftFile(path=f"wheels/{w.filename}", size=w.size, sha256=w.sha256, kind="wheel",
                               source=dict(w.source))) for w in wheels]


@dataclass(frozen=True)
class Bootstrap:
    """The hashed requirements file that installs airgap alone, and the packages it names."""

    path: Path
    entry: DraftFile
    packages: frozenset[str]


def _bootstrap_requirements(spec: Spec, wheels: list[ResolvedWheel], work: Path) -> Bootstrap:
    """Pinned, hashed requirements for airgap alone, so an operator can install the tool with plain pip."""
    needed = resolve_wheels(
        runtime_requirements(), dest=work / "bootstrap", find_links=[wheels[0].path.parent], no_index=True,
        python_version=spec.python.python_version, platforms=spec.python.platforms, progress=False,
    )
    names = {w.name for w in needed} | {"airgap"}
    lines = [f"{w.name}=={w.version} --hash=sha256:{w.sha256}\n" for w in wheels if w.name in names]
    path = work / BOOTSTRAP_REQUIREMENTS
    path.write_text("".join(lines))
    entry = DraftFile(path=BOOTSTRAP_REQUIREMENTS, size=0, kind="meta", source={"type": "generated"})
    return Bootstrap(path=path, entry=entry, packages=frozenset(names))
