"""``DerivativesSink``: copies a node's output into the derivatives dataset, fMRIPrep style."""

from __future__ import annotations

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)


class _SinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="file to store")
    source_file = File(exists=True, mandatory=True, desc="raw file it derives from")
    base_directory = Directory(mandatory=True, desc="derivatives dataset root")
    bids_dir = Directory(mandatory=True, desc="raw dataset root (for BIDS URIs)")
    source_entities = traits.Dict(mandatory=True, desc="pybids entities of source_file")
    suffix = traits.Str(mandatory=True)
    desc = traits.Str(desc="desc entity of the output")
    drop_entities = traits.List(traits.Str, desc="source entities the output does not keep")
    extra_sources = traits.List(File(exists=True), desc="other raw inputs (collection members)")
    source_uris = traits.List(traits.Str, desc="BIDS URIs of inputs that are not raw files "
                                               "(maps of this run: bids::sub-X/...)")
    meta_dict = traits.Dict(desc="metadata for the JSON sidecar (from the processing node)")
    extra_meta = traits.Dict(desc="static metadata for the sidecar (description, units)")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(desc="stored file")
    out_meta = File(desc="stored JSON sidecar")


class DerivativesSink(SimpleInterface):
    """Write ``in_file`` under its BIDS derivative name, with a sidecar, atomically."""

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    # Outputs live outside the work dir, so a cached result must not skip a missing output.
    always_run = True

    def _run_interface(self, runtime):
        from pathlib import Path

        from traits.api import Undefined

        from qmri_bids.artifacts import atomic_copy, atomic_write_json
        from qmri_bids.bids.derivatives import bids_uri, derivative_path, sidecar_for

        desc = self.inputs.desc if self.inputs.desc is not Undefined else None
        drop = tuple(self.inputs.drop_entities or ())
        out = derivative_path(Path(self.inputs.base_directory), self.inputs.source_entities,
                              self.inputs.suffix, desc=desc, drop=drop)
        sources = [self.inputs.source_file, *(self.inputs.extra_sources or [])]
        meta = {**(self.inputs.extra_meta or {}), **(self.inputs.meta_dict or {}),
                "Sources": [bids_uri(Path(self.inputs.bids_dir), Path(s)) for s in
                            dict.fromkeys(sources)] + list(self.inputs.source_uris or [])}
        atomic_copy(Path(self.inputs.in_file), out)
        atomic_write_json(sidecar_for(out), meta)
        self._results["out_file"] = str(out)
        self._results["out_meta"] = str(sidecar_for(out))
        return runtime
