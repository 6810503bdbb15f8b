module github.com/telepresenceio/go-fuseftp/rpc

go 1.25

require (
	google.golang.org/grpc v1.80.0
	google.golang.org/protobuf v1.36.11
)
