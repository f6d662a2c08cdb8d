"""Knowledge Condensation Distillation trainer: ``python -m kcd_fast.train``.

From a one-minute demo on real data (scikit-learn's digits, the default) to ImageNet
ResNet34 -> ResNet18 on torchrun::

    python -m kcd_fast.train                                   # digits: teacher, then KCD, < 2 min on 2 CPUs
    python -m kcd_fast.train --dataset cifar100 --data-dir DIR --teacher-weights T.pth
    torchrun --nproc_per_node 8 -m kcd_fast.train --dataset imagenet --data-dir DIR   # torchvision's ResNet34 teacher
    python -m kcd_fast.train --test-only --student-weights runs/kcd/student_best.pth  # score a saved student

Laid out as torchvision's classification reference:

* :mod:`~kcd_fast.train.options`: ``get_args_parser()``, the per-dataset defaults, and the options a run
  leaves unused;
* :mod:`~kcd_fast.train.config`: ``resolve(args)``, the read-only :class:`~kcd_fast.train.config.Config`
  built once, every number and path checked;
* :mod:`~kcd_fast.train.main`: ``main(args)``, the run as a list of named steps, and ``cli(argv)``;
* :mod:`~kcd_fast.train.engine`: ``train_one_epoch`` and ``evaluate``;
* :mod:`~kcd_fast.train.loaders` (:mod:`~kcd_fast.train.jpeg_loader`: ``--loader cpu|gpu``),
  :mod:`~kcd_fast.train.teacher`, :mod:`~kcd_fast.train.cached`, :mod:`~kcd_fast.train.checkpoint`,
  :mod:`~kcd_fast.train.outputs`, :mod:`~kcd_fast.train.distributed`.

``kcd_fast.train.main.main(args)`` returns the summary dict and raises :class:`~kcd_fast.train.config.UserError` for bad
input; the command line turns that into a one-line message and exit code 2. Outputs in
``--output-dir``: ``checkpoint.pth`` (every epoch, atomic), ``metrics.jsonl``, ``summary.json``,
``student.pth``, ``student_best.pth``, ``condensed.pt``, ``plots/*.png`` and, with tensorboard
installed, ``tb/``.
"""
