"""Throughput and memory benchmarks: ``python -m segvoc.bench [--short] [--device auto|cpu|cuda] [--json out.json]``.

A fixed set of measurements, each through the code path that training, validation or prediction really runs
(BENCHMARKS.md says what each one times, how to read it, and what was measured where):

``data``     decode + train augmentation of VOC-size JPEGs into ``crop_size`` crops (``VOCDataModule``'s training
             set): in this process on one core, then through the training DataLoader the data module builds, with one
             worker and with one worker per core.
``train``    training steps at ``crop_size`` through Lightning (the configured ``SegmentationModule`` and
             ``Trainer.fit``) for every precision the device supports, ``channels_last`` off/on and ``torch.compile``
             off/on; for the eager settings also through a plain PyTorch loop doing the same work, and Lightning's
             overhead per step over it.
``val``      whole VOC-size images (landscape and portrait) through ``trainer.validate``.
``predict``  JPEG files on disk to mask PNGs on disk through ``segvoc.tasks.predict.run``.
``flops``    FLOPs of one forward pass at ``1 x 3 x crop_size x crop_size`` counted by ``torch.utils.flop_counter``.
``deploy``   batch-1 CPU latency (median, p95) at ``crop_size`` square and the whole image size, 1 thread and all
             cores, of PyTorch eager fp32, PyTorch bf16 autocast + channels_last, ONNX Runtime fp32 and int8
             (``deploy.py``); int8 speed-ups and the file sizes.
``memory``   (always, last) the peak host memory of the whole run and the largest peak device memory.

Every figure records its device (CPU model or GPU name), torch version and threads, and the peak host memory
(resident set of this process) and peak device memory during that measurement. Without ``--data-root`` the images are
generated in a temporary VOC-layout tree. With ``--json`` the file is rewritten after every measurement, so a crash
or an interrupt keeps everything measured before it; a measurement that fails is recorded with its error and the
others still run.

The files, in the order a run uses them:

``__main__.py``   the command line: options, warnings filtered, the table printed at the end.
``runner.py``     ``Bench``: the options resolved (device, sizes, batch sizes), the generated data, the training
                  config every section composes, and the sections run in order.
``sections.py``   one function per section, each timing the real code path and recording its figures.
``deploy.py``     the deploy section: export, int8 quantisation and latency of the deployable forms.
``workloads.py``  what the train section runs and how it is clocked: ``Trainer.fit`` and the plain PyTorch loop.
``report.py``     one figure (``Result``), its device and memory probes, the JSON file and the table.
"""
