"""The shared-lab service: one long-lived control plane behind an HTTP API.

``views`` answers ``ls``/``status``/``show`` (the CLI renders the same Structs, read from the
store or from a server), ``people`` keeps tokens and who submitted what, ``auth`` decides who
may do what, ``submit`` runs a submission through the session code on the long-lived control
plane, ``app`` is the Litestar application, ``client`` the CLI's side of ``--server``.
"""
