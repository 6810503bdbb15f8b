module github.com/telepresenceio/telepresence/cmd/cobraparser/v2

go 1.25

require (
	github.com/docker/docker v28.5.2+incompatible
	github.com/spf13/pflag v1.0.10
)
