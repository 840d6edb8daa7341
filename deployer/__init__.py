"""The deployer: builds images from commits and rolls releases out behind a real HAProxy.

Entry points: ``python -m deployer`` (the Kafka service, ``deployer.service``), ``Deployer``
(carries out one command, no Kafka), ``deployer.proxy.Proxy`` (the proxy), ``deployer.build``
(clone, Dockerfile, build, test) and the strategies under ``deployer.strategies``.
"""
