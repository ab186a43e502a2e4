"""The DICOM AI node: the application that composes the ``inference`` and ``sr_writer`` libraries.

One subpackage per stage, each answering one question:

- :mod:`dicom_node.intake`: what is received and kept. ``handlers`` (the C-STORE decision: validate, write, record),
  ``server`` (the AE, TLS per connection, association checks and refusals), ``transport`` and ``reactor`` (all the
  code on pynetdicom's private API: bounded socket reads, event-driven association threads, data sets spooled as they
  arrive), ``header`` (the few header values read from a received data set), ``spool`` (received files on disk).
- :mod:`dicom_node.jobs`: what is to be done, and its state. ``schema`` (tables and records), ``store`` (the job
  store, source of truth), ``rules`` (routing rules), ``lease`` (when a running job or an export counts as abandoned),
  ``actions`` (retry and cancel, for the CLI and the console).
- :mod:`dicom_node.work`: who does it. ``celery_app`` (the Celery app and its tasks), ``queues`` (the queue names),
  ``steps`` (the inference and export steps the tasks call), ``supervisor`` (the node's own worker processes),
  ``heartbeat`` (which workers are alive, on any host),
  ``embedded_broker`` (the broker when there is no Redis).
- :mod:`dicom_node.export`: results back to the PACS. ``destinations`` (each destination kind and its transport,
  return to sender included), ``scu`` (C-STORE and C-ECHO), ``stow`` (DICOMweb STOW-RS, QIDO-RS echo), ``outcome``
  (send reports, status classification, reasons).
- :mod:`dicom_node.console`: what the administrator sees and does over HTTP. ``app`` (pages, JSON API, health),
  ``server`` (uvicorn in the node), ``users`` (accounts, roles, API tokens), ``health`` (readiness), ``preview``
  (images with their boxes), ``webhooks`` (notifications that follow the job store's history).
- :mod:`dicom_node.devtools`: the demo and test harnesses (Orthanc, a receiving SCP), apart from the product.

At the top: ``node`` (the composition root: spool, job store, SCP, assembler, reconciler), ``cli`` (the
``dicom-node`` command), ``config`` (the settings tree), ``status`` (the DIMSE status codes, for intake and export
alike), ``logs``, ``tls``, ``metrics``, ``permissions``.
"""
