"""finegrained: the library under the project's command-line scripts (run.py, data.py, lr_find.py, test.py, ...),
as timm keeps its scripts over the timm package.

Layers, top to bottom; a module imports only from layers below its own, and modules on one line not from each
other (import-linter checks this from pyproject.toml: `make lint`, part of `make test`):
  predictor                                     the Python API: a run folder or an exported file, predicting images
  runner | holdout                              run.py's and test.py's command lines and what they do
  sanity | report | explain | trackers          checks and views of a run
  | regularize | onnx_model                     mixup/cutmix and the EMA as fastai callbacks; an exported file run by onnxruntime
  evaluate                                      a model's scores, one way: top-k, confusion and per class, the box metrics
  train                                         the stages, on fastai's Learner
  distributed | plots | train_progress          data-parallel plumbing; the training curves; progress while training
  devices                                       --device: CUDA or the CPU, the precision, the CPU-time estimate
  models                                        the Learner: backbone, head, loss, optimizer
  data                                          fastai DataLoaders from train.csv
  boxes                                         the localize head's loss, metrics, box frames and DataBlock
  recipe                                        the recipe files, their keys and checks
  heads                                         the classification and localization heads
  prepare                                       train.csv / test.csv from downloads or the user's files
  images | cli                                  image decoding and box regions; the scripts' flags and exit codes
  files                                         atomic writes (JSON, CSV, PNG, HTML, weights), the run-folder lock
  errors | ranks                                UserError and RunFailed: one line and an exit status; which process
                                                this is (is_main, from the launcher's environment)

Imports sit at the top of each module. runner, holdout and recipe load the layers below them inside functions, on
purpose: a script's --help then answers without importing torch and fastai (seconds on a cold start)."""
