"""The online endpoint (Ray Serve): :mod:`~raydetect.serve.app` (deployment, routes, the typed
application builder), :mod:`~raydetect.serve.http` (request parsing, response models),
:mod:`~raydetect.serve.metrics`, :mod:`~raydetect.serve.autoscale` (shared-pool autoscaling
policy), :mod:`~raydetect.serve.ingress` and :mod:`~raydetect.serve.haproxy` (HAProxy ingress),
:mod:`~raydetect.serve.launch` (``raydetect serve``'s process).

``serve run raydetect.serve:app_builder model=...`` and Serve config files with
``import_path: raydetect.serve:app_builder`` keep working: the builder is exported here, lazily
(importing the package does not import Ray Serve).
"""


def __getattr__(name: str):
    if name == "app_builder":
        import importlib

        return importlib.import_module("raydetect.serve.app").app_builder
    raise AttributeError(f"module 'raydetect.serve' has no attribute {name!r}")
