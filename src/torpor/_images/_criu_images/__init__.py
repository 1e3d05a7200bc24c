"""torpor's own protobuf declarations of the CRIU image entries ``torpor inspect`` decodes.

``criu_images.proto`` declares only the messages and fields torpor shows; field numbers are
facts of CRIU's image format. The ``criu_images_pb2`` modules are generated from it; regenerate
them from this directory with Debian's protoc 3.21:

    protoc --python_out=. --pyi_out=. criu_images.proto
"""
